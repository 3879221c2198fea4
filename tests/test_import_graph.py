"""The package's modules import each other without a circle.

``test_layers`` orders the layers; this orders the modules inside them. The graph has an edge
from a module to every module it imports, the lazy imports inside functions and the lazy
loaders' ``"prism_deploy...."`` name tables included (a lazy import is still a dependency), and
``from package import name`` counts as importing ``name`` when ``name`` is a module of that
package, else the package's ``__init__``. Merely being inside a package is not an edge: Python
runs the package's ``__init__`` first, but that order is the interpreter's, not a dependency
the code chose.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "prism_deploy"
ROOT = PACKAGE.name


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str], package: Path = PACKAGE) -> set[str]:
    """The package's modules ``path`` imports (see the module docstring)."""

    def resolve(dotted: str) -> str | None:  # the longest prefix that is a module
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in modules:
                return ".".join(parts[:n])
        return None

    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(ROOT + "."):
            found.add(resolve(node.value))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == ROOT:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else resolve(node.module))
        elif isinstance(node, ast.Import):
            found.update(resolve(a.name) for a in node.names if a.name.split(".")[0] == ROOT)
    return {m for m in found if m is not None} - {module_name(path, package)}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    return {name: imported_modules(path, set(paths), package) for name, path in paths.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # recursive: the package's import chains are a few dozen deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_package_imports_without_a_circle():
    assert circles(import_graph()) == []


def test_the_check_sees_a_circle(tmp_path):
    """Negative control: a lazy import back, through a package ``__init__`` and a name table."""
    pkg = tmp_path / ROOT
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text(f"from {ROOT}.a.one import f\n")
    (pkg / "a" / "one.py").write_text(f"def f():\n    from {ROOT}.two import g\n")
    (pkg / "two.py").write_text(f"_LAZY = {{'g': ('{ROOT}.a', 'f')}}\n")
    (pkg / "three.py").write_text(f"from {ROOT} import two\nimport {ROOT}.a.one\n")
    graph = import_graph(pkg)
    assert graph[f"{ROOT}.three"] == {f"{ROOT}.two", f"{ROOT}.a.one"}
    assert circles(graph) == [[f"{ROOT}.a", f"{ROOT}.a.one", f"{ROOT}.two"]]
