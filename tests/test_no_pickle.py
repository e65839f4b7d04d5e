"""No pickle anywhere in our code: no pickle-family imports, no pickling helpers, torch.load only with
weights_only=True. The check parses every Python file of the repository (comments and docstrings
may mention pickle)."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
PICKLING_CALLS = {"send_pyobj", "recv_pyobj", "read_pickle", "to_pickle"}
"""pyzmq's pickle helpers and pandas' pickle I/O."""


def violations(source: str, name: str = "<source>") -> list[str]:
    """Every pickle use in ``source``, one ``name:line: what`` string each."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr, owner = node.func.attr, node.func.value
            keywords = {k.arg: k.value for k in node.keywords}
            if attr in PICKLING_CALLS:
                found.append(f"{where}: .{attr}()")
            elif attr == "load" and isinstance(owner, ast.Name) and owner.id == "torch":
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            elif attr == "load" and isinstance(owner, ast.Name) and owner.id in ("np", "numpy"):
                flag = keywords.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    found.append(f"{where}: numpy load with allow_pickle")
    return found


def python_files() -> list[Path]:
    """Tracked and untracked (not ignored) ``*.py`` files, as git sees them."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [REPO / p for p in listed if (REPO / p).is_file()]


def test_the_checker_finds_each_kind_of_pickle_use():
    bad = """
import pickle, os
import dill as d
from cloudpickle import dumps
torch.load(path)
torch.load(path, weights_only=False)
sock.recv_pyobj()
np.load(path, allow_pickle=True)
"""
    assert [v.split(": ", 1)[1] for v in violations(bad)] == [
        "import pickle",
        "import dill",
        "from cloudpickle import ...",
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        ".recv_pyobj()",
        "numpy load with allow_pickle",
    ]
    fine = '"""We never pickle."""\ntorch.load(p, map_location="cpu", weights_only=True)\nnp.load(p)\n'
    assert violations(fine) == []


def test_no_pickle_in_the_repository():
    files = python_files()
    assert any(p.name == "checkpoint.py" for p in files)  # the listing really covers the source tree
    found = [
        v for p in files if p != Path(__file__).resolve() for v in violations(p.read_text(), str(p.relative_to(REPO)))
    ]
    assert not found, "pickle in the source tree:\n" + "\n".join(found)
