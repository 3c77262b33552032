"""Fixtures for the Python suite: every test runs real processes on file
discovery in its own temporary directory, listening on loopback only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[3]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


def binary(name: str) -> Path:
    """A debug binary of the workspace (`make python-test` builds them)."""
    path = TARGET / "debug" / name
    if not path.exists():
        pytest.fail(
            f"{path} is missing: run `cargo build -p switchyard -p switchyard-runtime --example hello_world` "
            "(with the same CARGO_TARGET_DIR), or `make python-test`"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mesh:
    """Processes sharing one discovery directory; all stopped at teardown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.env = {
            **os.environ,
            "DYN_DISCOVERY_BACKEND": "file",
            "DYN_FILE_KV": str(directory / "kv"),
            "DYN_TCP_RPC_HOST": "127.0.0.1",
            "DYN_SYSTEM_HOST": "127.0.0.1",
            "DYN_LOG": "warn",
            "PYTHONUNBUFFERED": "1",
        }
        self.processes: list[subprocess.Popen[str]] = []

    def start(self, args: list[str], **env: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            args,
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes.append(process)
        return process

    def python(self, script: str, *args: str, **env: str) -> subprocess.Popen[str]:
        return self.start([sys.executable, str(HERE / script), *args], **env)

    def run(self, args: list[str], timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(args, env={**self.env, **env}, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        return result

    def run_python(self, script: str, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        return self.run([sys.executable, str(HERE / script), *args], timeout=timeout, **env)

    def wait_line(self, process: subprocess.Popen[str], prefix: str, timeout: float = 30) -> str:
        """The first stdout line starting with `prefix` (the process's readiness signal)."""
        deadline = time.monotonic() + timeout
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if line.startswith(prefix):
                return line.strip()
            if not line and process.poll() is not None:
                break
        stderr = process.stderr.read() if process.poll() is not None and process.stderr else ""
        raise AssertionError(f"no {prefix!r} line from {process.args} within {timeout}s\n{stderr}")

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path)
    try:
        yield mesh
    finally:
        mesh.stop_all()
