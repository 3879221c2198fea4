"""Data flows one way through the package: each layer imports only the layers before it.

The chain is format -> reference -> lower -> fuse -> builder -> runtime -> serving/cli, with the
target backends (build and open per target) below the builder and the runtime, beside TensorRT;
fitting, planning, the kernel, TensorRT, model export, parity and benchmarks sit beside it and
use its pieces; ``core`` is below everything. Every import counts, including the lazy ones
inside functions and the names the package root loads on first use: a lazy import is still a
dependency, only a cheaper one. There are no exceptions: a new edge means either a misplaced
module or a change to this table, made on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "prism_deploy"

# What every layer may use; it imports no layer itself (the package version lives in core.version).
SHARED = {"core"}

ALLOWED: dict[str, set[str]] = {
    "format": set(),
    "reference": {"format"},
    "plan": {"format"},
    "kernel": set(),
    "lower": {"format"},
    "fuse": {"format", "lower", "kernel"},
    "trt": {"kernel"},
    "models": {"format"},
    # one backend object per target (builds, opens, checks its engines): below the builder
    # (build) and the runtime (open) so both use the same object; it reaches TensorRT's API
    # through trt, and is handed the runtime's graph loader rather than importing it
    "target_backends": {"format", "trt"},
    "builder": {"format", "lower", "fuse", "trt", "target_backends"},
    "runtime": {"format", "lower", "fuse", "trt", "target_backends"},
    "serving": {"format", "builder", "runtime", "target_backends"},
    # beside the flow: they use its pieces, nothing in the flow uses them
    "fit": {"format", "reference", "plan"},
    "parity": {"format", "reference", "lower", "builder", "runtime", "models", "target_backends"},
    # bench-model times model folders and their transformers source (bench/models.py)
    "bench": {"format", "reference", "plan", "kernel", "lower", "trt", "runtime", "models", "target_backends"},
    "cli": {
        "format",
        "reference",
        "plan",
        "lower",
        "fuse",
        "builder",
        "runtime",
        "serving",
        "fit",
        "models",
        "parity",
        "bench",
        "kernel",
        "trt",
        "target_backends",
    },
    # the package root names the user-facing pieces (lazily)
    "__init__": {"format", "reference", "plan", "runtime"},
    "__main__": {"cli"},
}


def layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def imported_layers(path: Path) -> set[str]:
    """The first component after ``prism_deploy.`` of every import in the file, and of every
    ``"prism_deploy.<layer>..."`` module name written as a string (the lazy loaders' tables)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("prism_deploy."):
            found.add(node.value.split(".")[1])
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "prism_deploy":
                continue
            found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import; this package imports absolutely")
        elif isinstance(node, ast.Import):
            found.update(
                a.name.split(".")[1]
                for a in node.names
                if a.name.startswith("prism_deploy.") and a.name.count(".") >= 1
            )
    return found


def import_table() -> dict[str, dict[str, set[str]]]:
    """layer -> imported layer -> the files that import it."""
    table: dict[str, dict[str, set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        src = layer_of(path)
        for dst in imported_layers(path) - {src}:
            table.setdefault(src, {}).setdefault(dst, set()).add(str(path.relative_to(PACKAGE)))
    return table


def test_every_layer_is_in_the_table():
    layers = {layer_of(p) for p in PACKAGE.rglob("*.py")}
    assert layers - SHARED - set(ALLOWED) == set(), "a new top-level module: place it in ALLOWED or SHARED"


@pytest.mark.parametrize("layer", sorted(SHARED))
def test_shared_modules_import_no_layer(layer):
    table = import_table()
    assert set(table.get(layer, {})) <= SHARED, table.get(layer)


def test_imports_follow_the_flow():
    wrong = {
        f"{src} -> {dst}": sorted(files)
        for src, deps in import_table().items()
        if src not in SHARED
        for dst, files in deps.items()
        if dst not in SHARED and dst not in ALLOWED[src]
    }
    assert wrong == {}


def test_the_check_sees_a_backward_import(tmp_path):
    """Negative control: the parser finds lazy, dotted and aliased imports."""
    src = tmp_path / "probe.py"
    src.write_text(
        "def f():\n    from prism_deploy.runtime.engines import open_entry\n"
        "    import prism_deploy.cli.main as m\n    from prism_deploy import core\n"
        "_LAZY = {'Pipeline': 'prism_deploy.runtime.chain', 'x': ('prism_deploy.fit', 'y')}\n"
    )
    assert imported_layers(src) == {"runtime", "cli", "core", "fit"}
