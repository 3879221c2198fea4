#!/usr/bin/env python
"""Type-check prism_deploy/trt against TensorRT's type stubs.

The PyPI ``tensorrt-stubs`` package installs ``tensorrt/__init__.pyi`` and
``tensorrt_bindings/*.pyi`` without a ``py.typed`` marker, so mypy skips them as "installed
but untyped"; and it has no ``tensorrt.plugin``. This script copies those stubs into a
temporary folder, overlays ``stubs/tensorrt-plugin`` (the project's own minimal stub of
``tensorrt.plugin``), and runs mypy with that folder first on its search path.

Exit code: mypy's; 3 when tensorrt-stubs is not installed (``pip install --no-deps tensorrt-stubs``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL_STUBS = ROOT / "stubs" / "tensorrt-plugin"


def installed_stub_dirs() -> list[Path]:
    """The installed ``tensorrt`` and ``tensorrt_bindings`` stub folders (empty if missing)."""
    dirs = []
    for name in ("tensorrt", "tensorrt_bindings"):
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec else []
        found = [Path(p) for p in locations if (Path(p) / "__init__.pyi").is_file()]
        if not found:
            return []
        dirs.append(found[0])
    return dirs


def repair_stub(path: Path) -> None:
    """Fix the two syntax errors of tensorrt-stubs 10.13.0.35.1 in our temporary copy.

    Its generator kept pybind11's parameter name ``in`` (a Python keyword) and, in
    ``add_scale_nd``, a parameter without a default after ones with defaults.
    """
    if not path.is_file():
        return
    text = path.read_text()
    text = re.sub(r"([(,]\s*)in(\s*:)", r"\1in_\2", text)
    text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
    path.write_text(text)


def main(argv: list[str]) -> int:
    dirs = installed_stub_dirs()
    if not dirs:
        print("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs", file=sys.stderr)
        return 3
    with tempfile.TemporaryDirectory(prefix="prism-trt-stubs-") as tmp:
        for d in dirs:
            shutil.copytree(d, Path(tmp) / d.name, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        repair_stub(Path(tmp) / "tensorrt_bindings" / "tensorrt.pyi")
        shutil.copytree(LOCAL_STUBS / "tensorrt" / "plugin", Path(tmp) / "tensorrt" / "plugin")
        # The generated stubs are not clean under mypy (e.g. a class named ``bool`` shadows the
        # builtin in annotations): use their names and types, do not report their own errors.
        config = Path(tmp) / "mypy.ini"
        config.write_text(
            "[mypy]\nfollow_imports = silent\nignore_missing_imports = True\n"
            "disallow_untyped_defs = True\nwarn_unused_ignores = True\n"
            "[mypy-tensorrt_bindings.*]\nignore_errors = True\n[mypy-tensorrt]\nignore_errors = True\n"
        )
        env = dict(os.environ, MYPYPATH=tmp)
        cmd = [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(config),
            "--no-incremental",
            *(argv or ["prism_deploy/trt"]),
        ]
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
