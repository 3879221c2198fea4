"""The TensorRT path: type-checked against ``tensorrt-stubs`` everywhere, run where TensorRT is.

No real TensorRT can be installed on the CPU machines this project is developed on; there
``prism_deploy/trt/engine.py`` is checked by mypy against the stubs and the tests that need
the library skip with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prism_deploy.core.targets import gpu_present, tensorrt_available

ROOT = Path(__file__).resolve().parents[2]
HAVE_TRT, TRT_WHY = tensorrt_available()
needs_trt = pytest.mark.skipif(
    not (HAVE_TRT and gpu_present()),
    reason=f"needs a real TensorRT and a GPU ({TRT_WHY}; GPU present: {gpu_present()})",
)


# prism_deploy/trt/engine.py is type-checked against tensorrt-stubs by tests/trt/test_plugin.py,
# which checks the whole prism_deploy/trt package in one mypy run.


@pytest.mark.skipif(HAVE_TRT, reason="a real TensorRT is installed here")
def test_stubs_are_not_mistaken_for_tensorrt():
    ok, why = tensorrt_available()
    assert not ok and ("not installed" in why or "no Builder" in why)


@needs_trt
def test_trt_build_runs_and_matches_reference(tmp_path, capsys):  # pragma: no cover - GPU only
    from prism_deploy.cli.main import main
    from prism_deploy.format.engine_manifest import read_manifest
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
