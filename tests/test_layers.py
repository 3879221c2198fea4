"""Data flows one way through the package: each layer imports only the layers before it.

The chain is format -> reference -> lower -> fuse -> build -> runtime -> cli; fitting,
planning, the kernel, TensorRT, model export, parity and benchmarks sit beside it and use its
pieces. Every import counts, including the lazy ones inside functions: a lazy import is still a
dependency, only a cheaper one. A new edge means either a misplaced module or a change to this
table, made on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "prism_deploy"

# Modules every layer may use; they import no layer themselves.
SHARED = {"errors", "fsutil", "data", "onnx_io", "ort_session", "__version__"}

ALLOWED: dict[str, set[str]] = {
    "format": set(),
    "reference": {"format"},
    "plan": {"format"},
    "kernel": set(),
    "models": set(),
    "lower": {"format", "reference"},
    "fuse": {"format", "reference", "lower", "kernel"},
    "trt": {"kernel"},
    "fit": {"format", "reference", "plan"},
    # build checks each engine it made through the loader users get (runtime) against the
    # reference (parity) before moving it in: the one edge against the flow, on purpose.
    "build": {"format", "reference", "lower", "fuse", "trt", "models", "runtime", "parity"},
    "runtime": {"format", "reference", "lower", "fuse", "build", "models", "trt"},
    "parity": {"format", "reference", "lower", "models", "runtime"},
    "bench": {"format", "reference", "plan", "kernel", "lower", "trt", "runtime"},
    # Triton serving sits above the runtime; `triton update` builds a new adapter version (build)
    "serving": {"build", "runtime"},
    "cli": {"format", "reference", "plan", "lower", "fuse", "build", "runtime", "fit", "models", "parity", "bench",
            "kernel", "trt", "serving"},
    # the package root re-exports the user-facing pieces (lazily, for the heavy ones)
    "__init__": {"format", "reference", "plan", "runtime"},
    "__main__": {"cli"},
}


def layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def imported_layers(path: Path) -> set[str]:
    """The first component after ``prism_deploy.`` of every import in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "prism_deploy":
                continue
            found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import; this package imports absolutely")
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("prism_deploy.") and a.name.count(".") >= 1)
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


@pytest.mark.parametrize("layer", sorted(SHARED - {"__version__"}))
def test_shared_modules_import_no_layer(layer):
    table = import_table()
    assert set(table.get(layer, {})) <= SHARED, table.get(layer)


def test_imports_follow_the_flow():
    wrong = {
        f"{src} -> {dst}": sorted(files)
        for src, deps in import_table().items() if src not in SHARED
        for dst, files in deps.items() if dst not in SHARED and dst not in ALLOWED[src]
    }
    assert wrong == {}


def test_the_check_sees_a_backward_import(tmp_path):
    """Negative control: the parser finds lazy, dotted and aliased imports."""
    src = tmp_path / "probe.py"
    src.write_text("def f():\n    from prism_deploy.runtime.engines import open_entry\n"
                   "    import prism_deploy.cli.main as m\n    from prism_deploy import ort_session\n")
    assert imported_layers(src) == {"runtime", "cli", "ort_session"}
