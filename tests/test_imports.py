"""The package's import graph, read from the source: no cycle (lazy imports inside functions count), and the math
(model.py, janus.py: floor 1 of docs/STYLE.md's map) imports no I/O module and does no file I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import nanoseek

PACKAGE = Path(nanoseek.__file__).parent


# ------------------------------------------------------------------------------------------------------------
# the graph


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join((package, *(parts[:-1] if parts[-1] == "__init__" else parts)))


def import_graph(root: Path = PACKAGE, package: str = "nanoseek") -> dict[str, set[str]]:
    """module -> the package's modules it imports, at module level or inside a function (a lazy import is still an
    arrow): `from .x import y`, `from . import x`, `from .. import x`, `import nanoseek.x`, `from nanoseek.x import
    y`. `from . import NAME` where NAME is not a module (`__version__`) is an arrow to the package's __init__. The
    implicit import of a module's parent package is not an arrow (every module would depend on __init__)."""
    files = {_module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]  # the importing package
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                for alias in node.names:  # `import nanoseek.x.y`: the deepest module of the package named
                    parts = alias.name.split(".")
                    targets += [next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                                      if ".".join(parts[:i]) in files), "")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:  # `from base import name`: the submodule base.name, else base itself
                    targets.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
            graph[mod].update(t for t in targets if t in files and t != mod)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search, modules in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"nanoseek", "nanoseek.model", "nanoseek.weights", "nanoseek.janus"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_math_imports_only_the_math():
    """Floor 1: model.py imports no other nanoseek module, janus.py only model.py."""
    graph = import_graph()
    assert graph["nanoseek.model"] == set()
    assert graph["nanoseek.janus"] == {"nanoseek.model"}


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("back", [
    "from .a import f",
    "def g():\n    from .a import f\n    return f",  # a lazy import is still an arrow
    "from . import a",
    "import pkg.a",
    "from pkg.a import f",
    "from pkg import a",
])
def test_a_two_module_cycle_is_found(tmp_path, back):
    root = _write(tmp_path / "pkg", {"__init__.py": "", "a.py": "from .b import g\n\ndef f():\n    pass\n",
                                     "b.py": back + "\n"})
    graph = import_graph(root, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_graph_edges_in_a_subpackage_and_the_package_root(tmp_path):
    root = _write(tmp_path / "pkg", {
        "__init__.py": "__version__ = '1'\nfrom .a import f\n",
        "a.py": "def f():\n    from . import __version__\n    return __version__\n",  # -> pkg: a cycle
        "sub/__init__.py": "from .. import a\nfrom .c import x\n",
        "sub/c.py": "import os\nx = 1\n",  # a module outside the package is no arrow
    })
    graph = import_graph(root, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg"}, "pkg.sub": {"pkg.a", "pkg.sub.c"}, "pkg.sub.c": set()}
    assert find_cycle(graph) == ["pkg", "pkg.a", "pkg"]
    del graph["pkg"]
    assert find_cycle(graph) is None


# ------------------------------------------------------------------------------------------------------------
# no file I/O in the math

IO_MODULES = {"json", "pickle", "pathlib", "os", "shutil", "tempfile", "io", "glob", "safetensors"}
IO_ATTRIBUTES = {"read_text", "write_text", "read_bytes", "write_bytes"}


def io_uses(source: str, name: str) -> list[str]:
    """File I/O in one file's code (docstrings and comments are not code): an import of an I/O module, open(...),
    Path.read_text/write_text/read_bytes/write_bytes, torch.load/torch.save, json.load/json.dump."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:  # `from . import x` is the package's own module, never an I/O library
                mods = [] if node.level else [node.module or ""]
            found += [f"{where}: import {m}" for m in mods if m.split(".")[0] in IO_MODULES]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            found.append(f"{where}: open(...)")
        elif isinstance(node, ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if node.attr in IO_ATTRIBUTES or (owner, node.attr) in {
                    ("torch", "load"), ("torch", "save"), ("json", "load"), ("json", "dump")}:
                found.append(f"{where}: {owner + '.' if owner else ''}{node.attr}")
    return found


@pytest.mark.parametrize("name", ["model.py", "janus.py"])
def test_the_math_does_no_file_io(name):
    assert io_uses((PACKAGE / name).read_text(encoding="utf-8"), name) == []


@pytest.mark.parametrize("snippet", [
    "import json",
    "from pathlib import Path",
    "from safetensors.torch import save_file",
    "with open(p) as f:\n    pass",
    "x = p.read_text()",
    "p.write_text(s)",
    "sd = torch.load(f)",
    "torch.save(sd, f)",
    "def f(p):\n    import json\n    return json.load(p)",
])
def test_io_scan_flags(snippet):
    assert io_uses(snippet, "x.py")


def test_io_scan_ignores_docstrings_and_comments():
    assert io_uses('"""Saved with torch.save into safetensors files: open(path).read_text()."""\n'
                   "# json.load(open(p))\nx = 1\n", "x.py") == []
