"""The TensorRT path: type-checked against ``tensorrt-stubs`` everywhere, run where TensorRT is.

No real TensorRT can be installed on the CPU machines this project is developed on; there
``prism_deploy/trt/engine.py`` is checked by mypy against the stubs and the tests that need
the library skip with the reason.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from prism_deploy.runtime.ort_session import gpu_present
from prism_deploy.trt.engine import tensorrt_available

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRT, TRT_WHY = tensorrt_available()
needs_trt = pytest.mark.skipif(not (HAVE_TRT and gpu_present()),
                               reason=f"needs a real TensorRT and a GPU ({TRT_WHY}; GPU present: {gpu_present()})")


def _stub_dirs() -> list[Path] | None:
    """The installed ``tensorrt-stubs`` folders (``tensorrt/`` and ``tensorrt_bindings/``)."""
    found = []
    for name in ("tensorrt", "tensorrt_bindings"):
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec else []
        stub = next((Path(p) for p in locations if (Path(p) / "__init__.pyi").is_file()), None)
        if stub is None:
            return None
        found.append(stub)
    return found


def _repaired_stubs(dest: Path) -> Path:
    """Copy the stubs and repair what stops mypy parsing them.

    tensorrt-stubs 10.13.0.35.1 names parameters ``in`` (a Python keyword) in a few plugin
    methods and puts a parameter without a default after defaulted ones in ``add_scale_nd``;
    mypy refuses the whole file for either. The package has no ``py.typed`` either, so it is
    put on ``mypy_path`` instead of being read from site-packages.
    """
    dirs = _stub_dirs()
    if dirs is None:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    for d in dirs:
        shutil.copytree(d, dest / d.name, ignore=shutil.ignore_patterns("__pycache__"))
    bindings = dest / "tensorrt_bindings" / "tensorrt.pyi"
    text = re.sub(r"([(,] ?)in: ", r"\1in_: ", bindings.read_text())
    text = text.replace(", channel_axis: int)", ", channel_axis: int = ...)")
    bindings.write_text(text)
    return dest


@pytest.fixture(scope="module")
def mypy_setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Repaired stubs, a config and a shared cache (the second run reuses the stubs' analysis)."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    tmp_path = tmp_path_factory.mktemp("mypy")
    stubs = _repaired_stubs(tmp_path / "stubs")
    config = tmp_path / "mypy.ini"
    config.write_text(textwrap.dedent(f"""\
        [mypy]
        mypy_path = {stubs}
        follow_imports = silent
        check_untyped_defs = True
        warn_unused_ignores = True
        cache_dir = {tmp_path / "cache"}
        [mypy-tensorrt.*,tensorrt_bindings.*]
        ignore_errors = True
        [mypy-cuda.*,cupy.*,tensorrt_lean.*,tensorrt_libs.*,prism_deploy.trt.plugin]
        ignore_missing_imports = True
        """))
    return config


def _mypy(config: Path, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), str(target)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_engine_module_typechecks_against_tensorrt_stubs(mypy_setup):
    result = _mypy(mypy_setup, ROOT / "prism_deploy" / "trt" / "engine.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_stub_check_catches_a_wrong_tensorrt_call(mypy_setup, tmp_path):
    """The check above means something: the same set-up rejects a misuse of the API."""
    bad = tmp_path / "bad_trt.py"
    bad.write_text(textwrap.dedent("""\
        import tensorrt as trt

        def build(logger: trt.ILogger) -> None:
            builder = trt.Builder(logger)
            network = builder.create_network("strongly typed")
            builder.build_serialized_network(network)
        """))
    result = _mypy(mypy_setup, bad)
    assert result.returncode == 1
    assert "create_network" in result.stdout and "build_serialized_network" in result.stdout


@pytest.mark.skipif(HAVE_TRT, reason="a real TensorRT is installed here")
def test_stubs_are_not_mistaken_for_tensorrt():
    ok, why = tensorrt_available()
    assert not ok and ("not installed" in why or "no Builder" in why)


@needs_trt
def test_trt_build_runs_and_matches_reference(tmp_path, capsys):  # pragma: no cover - GPU only
    from prism_deploy.build.manifest import read_manifest
    from prism_deploy.cli.main import main
    from prism_deploy.reference import random_adapter, simple_config
    from prism_deploy.runtime import load_engines

    adapter = tmp_path / "a.safetensors"
    random_adapter(simple_config(64, 48, (4, 4), top_k=3, pipes=2, combine="weighted"), seed=0).save(adapter)
    out_dir = tmp_path / "eng"
    args = ["build", str(adapter), "-o", str(out_dir), "--target", "trt", "--batch", "1:2:4", "--seq", "1:8:16"]
    assert main([*args, "--precision", "fp16", "--refittable"]) == 0
    entry = read_manifest(out_dir)["engines"][0]
    assert entry["parity"]["passed"] and entry["device"]["compute_capability"]
    assert list(out_dir.glob("timing-*.cache"))
    x = np.random.default_rng(0).standard_normal((2, 8, 64)).astype(np.float32)
    assert load_engines(out_dir, precision="fp16").run(x).shape == (2, 8, 48)
    # retrained, same topology: the refittable engine is refit, not rebuilt
    random_adapter(simple_config(64, 48, (4, 4), top_k=3, pipes=2, combine="weighted"), seed=1).save(adapter)
    capsys.readouterr()
    assert main([*args, "--precision", "fp16", "--refittable"]) == 0
    assert "refit" in capsys.readouterr().out
