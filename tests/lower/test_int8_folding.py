"""Weight-only int8 graphs open with ONNX Runtime's DequantizeLinear folding enabled.

Without it ONNX Runtime dequantizes (and re-lays out) every weight on every call; with it the
weights become floats once, at session start. The speed-up is a benchmark matter
(benchmarks/README.md); here: the option is set exactly where it belongs, and folding changes
nothing but float rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

from prism_deploy.core.ort_session import make_session
from prism_deploy.core.precision import loosest
from prism_deploy.lower import export_onnx
from prism_deploy.reference import random_adapter, simple_config
from prism_deploy.runtime.adapter_session import AdapterGraph

KEY = "session.disable_quant_qdq"


@pytest.fixture(scope="module")
def adapter():
    return random_adapter(simple_config(40, 24, (3, 4), top_k=5, pipes=2, combine="weighted"), seed=3)


def _config_entry(session):
    try:
        return session.get_session_options().get_session_config_entry(KEY)
    except RuntimeError:  # ONNX Runtime raises for a key that was never set
        return "0"


@pytest.mark.parametrize("precision,expected", [("int8", "1"), ("fp32", "0"), ("int8-qdq", "0")])
def test_only_weight_only_int8_folds_its_dequantization(adapter, tmp_path, precision, expected):
    path = tmp_path / f"a-{precision}.onnx"
    calib = np.random.default_rng(0).standard_normal((64, 40)).astype(np.float32)
    export_onnx(adapter, path, precision=precision, calib=calib if precision == "int8-qdq" else None)
    runner = AdapterGraph(path)
    assert (_config_entry(runner.session) or "0") == expected


def test_folding_changes_only_rounding(adapter, tmp_path):
    path = tmp_path / "a-int8.onnx"
    export_onnx(adapter, path, precision="int8")
    x = np.random.default_rng(1).standard_normal((2, 5, 40)).astype(np.float32)
    folded = AdapterGraph(path).run(x)
    unfolded = make_session(path).run(["adapted"], {"hidden": x})[0]
    assert _config_entry(make_session(path)) == "0"
    np.testing.assert_allclose(folded, unfolded, rtol=1e-4, atol=1e-5)


def test_built_int8_engine_folds_at_load(adapter, tmp_path):
    from prism_deploy.cli.main import main
    from prism_deploy.format.engine_manifest import read_manifest
    from prism_deploy.runtime import load_engines

    src = tmp_path / "a.safetensors"
    adapter.save(src)
    out = tmp_path / "eng"
    assert main(["build", str(src), "-o", str(out), "--target", "ort-cpu", "--precision", "fp32,int8"]) == 0
    sessions = {e["configuration"]["precision"]: e["session"] for e in read_manifest(out)["engines"]}
    assert sessions["int8"]["load_session_config"] == {KEY: "1"}
    assert "load_session_config" not in sessions["fp32"]
    engines = load_engines(out, precision="int8", target="ort-cpu")
    x = np.random.default_rng(2).standard_normal((1, 3, 40)).astype(np.float32)
    ref = adapter(__import__("torch").from_numpy(x)).numpy()
    got = engines.run(x)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-2


@pytest.mark.parametrize("precision,expected", [("int8", "1"), ("int8-qdq", "0")])
def test_pipeline_adapter_runner_follows_the_lowered_precision(adapter, tmp_path, precision, expected):
    # both precisions store int8 weights; only weight-only int8 may fold its dequantization
    from prism_deploy.runtime.adapter_session import AdapterGraph

    path = tmp_path / f"p-{precision}.onnx"
    calib = np.random.default_rng(0).standard_normal((64, 40)).astype(np.float32)
    export_onnx(adapter, path, precision=precision, calib=calib if precision == "int8-qdq" else None)
    runner = AdapterGraph(path)
    assert runner.precision == precision  # what the lowering recorded; its tolerance class is int8
    assert loosest([runner.precision]) == "int8"
    assert _config_entry(runner.session) == expected
