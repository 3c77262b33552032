"""A Python engine behind the Rust OpenAI frontend, asked by the official
`openai` client; and migration when a Python worker leaves mid-answer."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from conftest import Mesh, binary, free_port


def frontend(mesh: Mesh, *flags: str) -> openai.OpenAI:
    return frontend_at(mesh, free_port(), *flags)


def frontend_at(mesh: Mesh, port: int, *flags: str) -> openai.OpenAI:
    mesh.start([str(binary("switchyard")), "frontend", "--http-host", "127.0.0.1", "--http-port", str(port), *flags])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if [m.id for m in client.models.list().data] == ["py-model"]:
                return client
        except openai.APIConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError("the frontend never listed py-model")


def expected(n: int) -> str:
    return "".join(f"w{i} " for i in range(n))


def test_a_python_engine_answers_the_openai_client_streamed_and_not(mesh: Mesh) -> None:
    mesh.wait_line(mesh.python("llm_worker.py"), "ready")
    client = frontend(mesh)
    messages = [{"role": "user", "content": "count for me"}]

    whole = client.chat.completions.create(model="py-model", messages=messages, max_tokens=6)
    assert whole.choices[0].message.content == expected(6), whole
    assert whole.choices[0].finish_reason == "length", whole
    assert whole.usage.completion_tokens == 6, whole.usage

    text, finish = "", None
    for chunk in client.chat.completions.create(model="py-model", messages=messages, max_tokens=5, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert (text, finish) == (expected(5), "length")

    completion = client.completions.create(model="py-model", prompt="count", max_tokens=3)
    assert completion.choices[0].text == expected(3), completion


def test_an_overloaded_python_engine_is_a_503(mesh: Mesh) -> None:
    mesh.wait_line(mesh.python("llm_worker.py", OVERLOADED="1"), "ready")
    client = frontend(mesh)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="py-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert refused.value.status_code == 503, refused.value


def test_the_frontend_migrates_when_a_python_worker_raises_engine_shutdown_mid_answer(
    mesh: Mesh, tmp_path: Path
) -> None:
    failures = tmp_path / "failures"
    mesh.wait_line(mesh.python("llm_worker.py", FAIL_AFTER="3", FAILURES=str(failures)), "ready")
    mesh.wait_line(mesh.python("llm_worker.py"), "ready")
    client = frontend(mesh, "--router-mode", "round_robin")
    messages = [{"role": "user", "content": "count for me"}]
    deadline = time.monotonic() + 10
    # Until both workers are known, round robin may keep picking one.
    while not failures.exists() and time.monotonic() < deadline:
        text = ""
        for chunk in client.chat.completions.create(model="py-model", messages=messages, max_tokens=8, stream=True):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        assert text == expected(8), "a migrated answer must go on where it broke off"
        whole = client.completions.create(model="py-model", prompt="count", max_tokens=8)
        assert whole.choices[0].text == expected(8), whole
    assert failures.exists(), "no request ever reached the failing worker"


def test_a_python_workers_load_reports_reach_the_frontends_router(mesh: Mesh) -> None:
    mesh.wait_line(mesh.python("llm_worker.py", LOAD_REPORTS="1", PIECE_DELAY="0.3"), "ready")
    port = free_port()
    client = frontend_at(mesh, port)

    def mesh_view() -> list[dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/mesh", timeout=5) as response:
            return [i for m in json.load(response)["models"] for i in m["instances"]]

    assert [i["reported_load"] for i in mesh_view()] in ([None], [0]), "nothing in flight yet"
    answer = threading.Thread(
        target=lambda: client.chat.completions.create(
            model="py-model", messages=[{"role": "user", "content": "slowly"}], max_tokens=10
        )
    )
    answer.start()
    deadline, seen = time.monotonic() + 2.5, None
    while time.monotonic() < deadline and seen != 1:
        seen = mesh_view()[0]["reported_load"]
        time.sleep(0.05)
    answer.join(timeout=30)
    assert seen == 1, "the worker's own report of one request in flight never reached the frontend"


def test_a_python_engines_kv_events_steer_the_frontends_kv_router(mesh: Mesh) -> None:
    for _ in range(2):
        mesh.wait_line(mesh.python("llm_worker.py", KV_EVENTS="1"), "ready")
    port = free_port()
    client = frontend_at(mesh, port, "--router-mode", "kv")
    # "user:", 100 words and "assistant:" in the mocker's tokenizer: 102
    # tokens, six full blocks of 16 (the router counts the partial seventh).
    prompt = " ".join(f"word{i}" for i in range(100))
    messages = [{"role": "user", "content": prompt}]

    def ask() -> tuple[str, dict[str, str]]:
        raw = client.chat.completions.with_raw_response.create(model="py-model", messages=messages, max_tokens=2)
        route = dict(part.split("=", 1) for part in raw.headers["x-switchyard-route"].split(";"))
        return raw.headers["x-switchyard-worker-id"], route

    first_worker, first_route = ask()
    assert first_route["index"] == "events", first_route
    assert first_route["overlap"] == "0", "nothing is cached before the first answer"
    # The worker published the prompt's blocks; once the router has them,
    # the same prompt goes back to it for its cache.
    deadline = time.monotonic() + 10
    while True:
        worker, route = ask()
        if int(route["overlap"]) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (route["overlap"], route["blocks"]) == ("6", "7"), route
    assert worker == first_worker, (worker, first_worker, route)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    events = sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("dynamo_frontend_kv_events_total")
    )
    assert events >= 1, "the router counted no KV event from the Python engines"


def test_kv_event_publisher_refuses_blocks_that_do_not_add_up(mesh: Mesh) -> None:
    result = mesh.run_python("kv_publisher_errors.py")
    assert result.returncode == 0, result.stdout + result.stderr
