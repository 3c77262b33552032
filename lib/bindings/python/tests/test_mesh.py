"""Python workers and callers in separate processes, with each other and
with Rust ones, on file discovery."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import Mesh, binary


def start_worker(mesh: Mesh, **env: str):
    worker = mesh.python("worker.py", **env)
    ready = mesh.wait_line(worker, "ready")
    return worker, ready


def test_a_python_caller_streams_from_a_python_worker_in_another_process(mesh: Mesh) -> None:
    start_worker(mesh)
    out = mesh.run_python("caller.py", "generate", json.dumps("hello mesh"))
    assert [json.loads(line) for line in out.stdout.splitlines()] == list("hello mesh")


def test_a_rust_caller_calls_a_python_worker(mesh: Mesh) -> None:
    start_worker(mesh)
    hello = binary("examples/hello_world")
    out = mesh.run([str(hello), "client"])
    assert 'received "hello world"' in out.stdout, out.stdout


def test_a_python_caller_calls_a_rust_worker(mesh: Mesh) -> None:
    hello = binary("examples/hello_world")
    mesh.start([str(hello), "server"])
    out = mesh.run_python("caller.py", "generate", json.dumps("hello world"))
    assert "".join(json.loads(line) for line in out.stdout.split("\n") if line) == "hello world"


def test_one_python_generator_streams_100000_items_in_order(mesh: Mesh) -> None:
    start_worker(mesh)
    out = mesh.run_python("caller.py", "test", json.dumps({"mode": "count", "n": 100_000}), "--count")
    assert "count 100000 last 99999" in out.stdout, out.stdout


def test_a_cancelled_request_cancels_the_python_handler_within_100_ms(mesh: Mesh, tmp_path: Path) -> None:
    start_worker(mesh)
    marker = tmp_path / "cancelled-at"
    out = mesh.run_python("cancel_caller.py", str(marker))
    cancelled_at = float(out.stdout.split()[-1])
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), "the handler never saw CancelledError"
    delay = float(marker.read_text()) - cancelled_at
    assert delay < 0.1, f"the handler was cancelled {delay * 1000:.0f} ms after the caller let go"


# Each exception a handler raises, and the class (and kind) the caller sees.
RAISED = [
    ("InvalidRequest", "InvalidRequest", "invalid"),
    ("ValueError", "InvalidRequest", "invalid"),
    ("TypeError", "InvalidRequest", "invalid"),
    ("Overloaded", "Overloaded", "overloaded"),
    ("EngineShutdown", "EngineShutdown", "shutting_down"),
    ("Cancelled", "Cancelled", "cancelled"),
    ("TimeoutError", "TimedOut", "timed_out"),
    ("NotFound", "NotFound", "not_found"),
    ("EngineError", "EngineError", "engine"),
    ("RuntimeError", "EngineError", "engine"),
    ("KeyError", "EngineError", "engine"),
]


def test_each_python_exception_reaches_the_caller_as_its_kind(mesh: Mesh) -> None:
    start_worker(mesh)
    cases = [{"mode": "raise", "class": raised} for raised, _, _ in RAISED]
    cases.append({"mode": "unserializable"})
    out = mesh.run_python("errors_caller.py", json.dumps(cases))
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    seen = [line for line in lines if "runtime" not in line]
    raised_by_runtime = {line["runtime"]: (line["class"], line.get("kind")) for line in lines if "runtime" in line}
    assert raised_by_runtime == {
        "direct to an unknown instance": ("NotFound", "not_found"),
        "nobody serves": ("TimedOut", "timed_out"),
    }
    expected = [{"class": cls, "kind": kind, "items": ["first"]} for _, cls, kind in RAISED]
    expected.append({"class": "EngineError", "kind": "engine", "items": []})
    assert [{k: s[k] for k in ("class", "kind", "items")} for s in seen] == expected
    assert "not JSON-like" in seen[-1]["message"]


def get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_a_blocking_handler_does_not_hold_up_other_requests(mesh: Mesh) -> None:
    _, ready = start_worker(mesh, DYN_SYSTEM_PORT="0")
    status = ready.split()[2]
    out = mesh.run_python("blocking_caller.py", status, timeout=60)
    result = json.loads(out.stdout.splitlines()[-1])
    # A plain generator that sleeps 1 s runs in a thread: a request sent
    # during the sleep is answered long before it ends.
    assert result["other_request_s"] < 0.5, result
    assert result["blocked_request_s"] >= 1.0, result
    # An async handler that blocks the event loop for 1 s (a mistake, but a
    # common one) holds up Python, not the runtime: /live answers meanwhile.
    assert result["live_during_blocked_loop_s"] < 0.5, result


def test_metrics_labels_and_custom_metrics_reach_the_status_server(mesh: Mesh) -> None:
    _, ready = start_worker(mesh, DYN_SYSTEM_PORT="0")
    status = ready.split()[2]
    mesh.run_python("caller.py", "test", json.dumps({"mode": "count", "n": 3}))
    code, body = get(f"http://{status}/metrics")
    assert code == 200
    requests = [line for line in body.splitlines() if line.startswith("dynamo_component_requests_total{")]
    assert any('model="test-model"' in line and 'dynamo_endpoint="test"' in line for line in requests), requests
    custom = [line for line in body.splitlines() if line.startswith("dynamo_component_handled_total{")]
    assert len(custom) == 1 and 'dynamo_endpoint="test"' in custom[0] and custom[0].endswith(" 1"), custom


def test_a_callers_stop_reaches_the_handlers_context(mesh: Mesh) -> None:
    start_worker(mesh)
    out = mesh.run_python("stop_caller.py")
    assert json.loads(out.stdout.splitlines()[-1]) == ["started", {"stopped": True, "killed": False}]


def test_sigterm_drains_in_flight_requests_then_exits(mesh: Mesh) -> None:
    worker, _ = start_worker(mesh)
    caller = mesh.python("caller.py", "test", json.dumps({"mode": "slow_ok", "seconds": 1.5}))
    time.sleep(0.7)  # the request is in flight
    worker.send_signal(signal.SIGTERM)
    out, err = caller.communicate(timeout=30)
    assert json.loads(out.strip()) == "finished", out + err
    assert worker.wait(timeout=30) == 0
    assert "drained" in worker.stdout.read()
    # It left discovery: a new caller finds no instance.
    listed = mesh.run([str(binary("switchyard")), "instances"])
    assert "demo/backend/test" not in listed.stdout, listed.stdout


def test_a_caller_that_stops_reading_suspends_the_python_generator(mesh: Mesh, tmp_path: Path) -> None:
    start_worker(mesh)
    out = mesh.run_python("backpressure_caller.py", str(tmp_path / "produced"))
    produced = int(out.stdout.split()[-1])
    # Ahead of the reader: the transport's window (DYN_TCP_STREAM_WINDOW,
    # 4096 items) plus the bindings' bounded queue (4 batches of 64, and one
    # batch being filled): about 4,400 items, not 100,000.
    assert 0 < produced <= 5000, f"the handler ran {produced} items ahead of a caller that stopped reading"


def test_without_graceful_shutdown_sigterm_ends_requests_in_flight_as_engine_shutdown(mesh: Mesh) -> None:
    worker, _ = start_worker(mesh)
    caller = mesh.python("caller.py", "abrupt", json.dumps({"mode": "slow_ok", "seconds": 20}))
    time.sleep(0.7)  # the request is in flight
    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    out, err = caller.communicate(timeout=30)
    assert out.startswith("error EngineShutdown shutting_down"), out + err
    assert time.monotonic() - signalled < 5, "the request waited for the drain instead of ending at once"
    assert worker.wait(timeout=30) == 0


def test_a_bad_setting_fails_with_an_error_that_names_it(mesh: Mesh) -> None:
    import subprocess
    import sys

    script = (
        "import asyncio\n"
        "from switchyard.runtime import DistributedRuntime\n"
        "async def main():\n"
        "    DistributedRuntime.detached()\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**mesh.env, "DYN_DISCOVERY_BACKEND": "zookeeper"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("switchyard.errors.SetupError"), result.stderr
    assert "DYN_DISCOVERY_BACKEND" in last and "zookeeper" in last and "etcd" in last, last
