"""docs/python.md's tutorial runs as written; the stubs cover the native
module; and the bridge's rule (no GIL on tokio threads) holds in the source."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import switchyard._core as core
from conftest import HERE, ROOT, Mesh


def tutorial_files() -> dict[str, str]:
    text = (ROOT / "docs" / "python.md").read_text()
    files = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        first = block.splitlines()[0]
        if first.startswith("# file: "):
            files[first.removeprefix("# file: ").strip()] = block
    return files


def test_the_tutorial_worker_and_caller_run_as_written(mesh: Mesh, tmp_path: Path) -> None:
    files = tutorial_files()
    assert set(files) == {"worker.py", "caller.py"}, files.keys()
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    worker = mesh.start([sys.executable, str(tmp_path / "worker.py")])
    mesh.wait_line(worker, "serving")
    out = mesh.run([sys.executable, str(tmp_path / "caller.py")])
    assert out.stdout.strip() == "HELLO FROM THE TUTORIAL", out.stdout


def test_every_native_class_and_function_has_a_stub() -> None:
    stub = ast.parse((HERE.parent / "python" / "switchyard" / "_core.pyi").read_text())
    stubbed = {node.name for node in stub.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    native = {name for name in dir(core) if not name.startswith("_")}
    assert native <= stubbed, f"no stub for {sorted(native - stubbed)}"


def test_no_rust_code_takes_the_gil_itself() -> None:
    # Python calls into Rust on its own threads (and holds the GIL there);
    # Rust never attaches to Python on its own, so never on a tokio thread.
    for source in (HERE.parent / "src").glob("*.rs"):
        code = [line for line in source.read_text().splitlines() if not line.lstrip().startswith("//")]
        text = "\n".join(code)
        for forbidden in ("Python::attach", "Python::with_gil", "future_into_py", "into_future("):
            assert forbidden not in text, f"{source.name} uses {forbidden}"
