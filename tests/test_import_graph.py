"""The import graph keeps its layers: ``streamrl.common`` imports no service, no service
imports another, nothing in the library imports the application (``streamrl.cli`` etc.),
and no module imports ``tests`` or ``bench``.

Every ``import``/``from ... import`` in the source (top level, inside functions, and under
``TYPE_CHECKING``) counts for the layers; the check parses the files with :mod:`ast` and
imports nothing. The modules form a DAG: no cycle of imports that run, counting those inside
functions (which hide a cycle from the interpreter, not from a reader) and not those under
``TYPE_CHECKING`` (annotations only).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {
    "streamrl.common": REPO / "common",
    "streamrl.services": REPO / "services",
    "streamrl.deploy": REPO / "deploy",
    "streamrl": REPO / "streamrl",
}
APPLICATION = "streamrl"


def module_name(path: Path) -> str:
    """Import name of a source file under one of ``ROOTS``."""
    for package, root in ROOTS.items():
        if root in path.parents:
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            return ".".join((package, *parts))
    raise ValueError(path)


def import_nodes(tree: ast.AST, *, runtime_only: bool = False) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, at any depth; ``runtime_only``: not those under
    ``if TYPE_CHECKING:`` (never executed)."""
    for node in ast.iter_child_nodes(tree):
        if runtime_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in import_nodes(child, runtime_only=True))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from import_nodes(node, runtime_only=runtime_only)


def imports_of(source: str, module: str, *, is_package: bool = False, runtime_only: bool = False) -> set[str]:
    """Absolute names of every module that ``source`` (module ``module``; ``is_package``: its
    ``__init__.py``) imports; ``runtime_only``: leave out imports under ``TYPE_CHECKING``."""
    found = set()
    for node in import_nodes(ast.parse(source), runtime_only=runtime_only):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = (module.split(".") + [""] * is_package)[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def layer(name: str) -> tuple[str, str | None] | None:
    """``("common", None)``, ``("service", "learner")``, ``("app", None)`` or None (third party)."""
    parts = name.split(".")
    if parts[0] in ("tests", "bench", "support"):
        return ("test", None)
    if parts[0] != "streamrl":
        return None
    if len(parts) > 1 and parts[1] in ("common", "deploy"):
        return ("common", None)
    if len(parts) > 1 and parts[1] == "services":
        return ("service", parts[2]) if len(parts) > 2 else ("service", None)
    if len(parts) == 1:  # `import streamrl` (the package root: version only)
        return ("root", None)
    return ("app", None)


def violations(module: str, imported: set[str]) -> list[str]:
    """Layering rules broken by ``module`` importing ``imported``, one line each."""
    own = layer(module)
    problems, reported = [], set()
    for name in sorted(imported):
        other = layer(name)
        if other is None or other[0] == "root" or other in reported:
            continue
        reported.add(other)
        if other[0] == "test":
            problems.append(f"{module} imports {name}: the package never imports tests/ or bench/")
        elif own[0] == "common" and other[0] in ("service", "app"):
            problems.append(
                f"{module} imports {name}: streamrl.common is a library and imports no "
                "service and no application module"
            )
        elif own[0] == "service" and other[0] == "app":
            problems.append(f"{module} imports {name}: a service imports no application module")
        elif own[0] == "service" and other[0] == "service" and other[1] not in (None, own[1]):
            problems.append(
                f"{module} imports {name}: services do not import each other; move the shared code to streamrl.common"
            )
    return problems


def source_files():
    for root in ROOTS.values():
        yield from sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def test_layers_hold_in_the_source_tree():
    problems = []
    for path in source_files():
        name = module_name(path)
        problems += violations(name, imports_of(path.read_text(), name))
    assert not problems, "\n".join(problems)


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """``{module: modules of ``sources`` it imports at run time}`` from ``{module: (source,
    is_package)}``. A ``from package import name`` counts as importing ``package.name`` when
    that is a module. The parent packages Python imports on the way are not counted (a
    package's ``__init__`` importing its own submodules is no cycle), but a submodule that
    names its own package is (it would read the package half-initialised)."""
    graph = {}
    for module, (source, is_package) in sources.items():
        imported = imports_of(source, module, is_package=is_package, runtime_only=True)
        graph[module] = {name for name in imported if name in sources and name != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """One cycle ``(a, b, ..., a)`` through each module that lies on one, each cycle reported once."""
    found, reported = [], set()
    for start in sorted(graph):
        stack, seen = [(start, (start,))], {start}
        while stack:
            node, trail = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start and frozenset(trail) not in reported:
                    reported.add(frozenset(trail))
                    found.append((*trail, start))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*trail, nxt)))
    return found


def test_no_import_cycles():
    """Every module of the package (common, services, application) forms a DAG with the others,
    counting imports inside functions (a cycle once joined security and transport; two more hid
    behind imports in functions: the learner's build and distributed modules, the pipeline and
    the CLI)."""
    found = tree_cycles()
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def tree_cycles() -> list[tuple[str, ...]]:
    """The import cycles among the source files under ``ROOTS``."""
    sources = {module_name(path): (path.read_text(), path.name == "__init__.py") for path in source_files()}
    return cycles(import_graph(sources))


def test_a_cycle_planted_in_a_package_on_disk_is_caught(tmp_path, monkeypatch):
    """The files as test_no_import_cycles reads them: a relative import inside a function closes a cycle."""
    root = tmp_path / "common"
    files = {
        "__init__.py": "",
        "a.py": "from streamrl.common.b import x\n",
        "b.py": "x = 1\n\n\ndef f():\n    from . import a\n\n    return a\n",
        "pkg/__init__.py": "from .inner import z\n",
        "pkg/inner.py": "import streamrl.common.a\n\nz = 2\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOTS", {"streamrl.common": root})
    assert tree_cycles() == [("streamrl.common.a", "streamrl.common.b", "streamrl.common.a")]
    (root / "b.py").write_text("x = 1\n")
    assert tree_cycles() == []


def test_a_cycle_through_a_function_level_import_is_caught():
    sources = {
        "streamrl.common.a": ("from streamrl.common.b import x\n", False),
        "streamrl.common.b": ("def f():\n    from streamrl.common import a\n", False),
        "streamrl.common.c": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from streamrl.common.a import y\nfrom streamrl.common.b import x\n",
            False,
        ),
        "streamrl.common.pkg": ("from streamrl.common.pkg.inner import z\n", True),
        "streamrl.common.pkg.inner": ("from streamrl.common.a import x\n", False),
    }
    assert cycles(import_graph(sources)) == [("streamrl.common.a", "streamrl.common.b", "streamrl.common.a")]
    sources["streamrl.common.a"] = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from streamrl.common.b import x\n",
        False,
    )
    assert cycles(import_graph(sources)) == []
    sources["streamrl.common.pkg.inner"] = ("from streamrl.common.pkg import z\n", False)  # its own package
    assert cycles(import_graph(sources)) == [
        ("streamrl.common.pkg", "streamrl.common.pkg.inner", "streamrl.common.pkg")
    ]


@pytest.mark.parametrize(
    "module, planted, rule",
    [
        (
            "streamrl.common.evaluation_like",
            "from streamrl.services.generator.sampling import sample_completions",
            "imports no service",
        ),
        ("streamrl.common.x", "import streamrl.cli", "no application module"),
        ("streamrl.services.learner.ptx", "from streamrl.services.generator import loop", "do not import each other"),
        ("streamrl.services.learner.ptx", "from ..generator.sampling import x", "do not import each other"),
        ("streamrl.services.scorer.loop", "def f():\n    from streamrl.status import read", "no application module"),
        ("streamrl.cli", "from tests.support import REPO", "never imports tests/"),
        (
            "streamrl.common.transport",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from streamrl.services.buffer.store import ReplayBuffer",
            "imports no service",
        ),
    ],
)
def test_a_planted_import_is_caught(module, planted, rule):
    found = violations(module, imports_of(planted, module))
    assert len(found) == 1 and rule in found[0], found


@pytest.mark.parametrize(
    "module, allowed",
    [
        ("streamrl.services.learner.loop", "from streamrl.services.learner.batch import collate"),
        ("streamrl.services.learner.loop", "from .batch import collate"),
        ("streamrl.services.generator.loop", "from streamrl.common.prompts import load_prompts"),
        ("streamrl.cli", "from streamrl.services.learner.checkpoint import latest_checkpoint"),
        ("streamrl.common.config", "from streamrl.deploy import DEFAULT_PROMPTS"),
    ],
)
def test_allowed_imports_pass(module, allowed):
    assert violations(module, imports_of(allowed, module)) == []
