"""`make bench-python`: the Python echo worker against the Rust one,
cross-process, in one run, measured by the same Rust caller (echo_bench).

    python bench/echo.py RELEASE_DIR [UNARY_REQUESTS STREAM_ITEMS]

Prints a Markdown table (docs/performance.md, "Python workers").
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RELEASE = Path(sys.argv[1])
UNARY = sys.argv[2] if len(sys.argv) > 2 else "20000"
ITEMS = sys.argv[3] if len(sys.argv) > 3 else "1000000"


def measure(env: dict, worker: list[str], path: str) -> dict:
    process = subprocess.Popen(worker, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        out = subprocess.run(
            [str(RELEASE / "examples" / "echo_bench"), path, UNARY, ITEMS],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


with tempfile.TemporaryDirectory() as kv:
    env = {
        **os.environ,
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_FILE_KV": kv,
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_LOG": "warn",
    }
    rust = measure(env, [str(RELEASE / "examples" / "hello_world"), "server"], "demo/backend/generate")
    python = measure(env, [sys.executable, str(HERE / "echo_worker.py")], "bench/python/echo")

print(f"Unary: {UNARY} one-item requests after a warm-up; streamed: one answer of {ITEMS} items.\n")
print("| worker | unary p50 | unary p99 | streamed items/s |")
print("|---|---|---|---|")
for name, r in (("Rust (hello_world server)", rust), ("Python (bench/echo_worker.py)", python)):
    print(f"| {name} | {r['p50_us']:.0f} µs | {r['p99_us']:.0f} µs | {r['items_per_s']:,.0f} |")
print(
    f"\nPython / Rust: unary p50 {python['p50_us'] / rust['p50_us']:.2f}×, "
    f"streamed {python['items_per_s'] / rust['items_per_s']:.2f}× the Rust rate."
)
