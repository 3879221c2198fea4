"""INT8 ungated pipes as ONNX Runtime's MatMulNBits (``ort_nbits``): the same int8 values and
scales as the DequantizeLinear graph, read at 8 bits; within the int8 bound of the reference."""

from __future__ import annotations

import numpy as np
import pytest

from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.lower import build_model, export_onnx, read_metadata
from prism_deploy.reference import random_adapter
from prism_deploy.runtime.adapter_session import AdapterGraph
from tests.lower_helpers import ort_run, reference, rel_l2

# "u" and "w" have power-of-two tile widths (MatMulNBits blocks); "odd" (tc 20) falls back to
# DequantizeLinear; in_dim 60 leaves the last 16-wide block partly padding
MIXED = AdapterConfig(
    60,
    50,
    (
        PipeSpec("u", (3, 4), (17, 16), None),
        PipeSpec("g", (2, 2), (25, 32), 2),
        PipeSpec("odd", (2, 3), (25, 20), None),
        PipeSpec("w", (2, 2), (25, 32), None),
    ),
    "weighted",
)


@pytest.fixture(scope="module")
def adapter():
    return random_adapter(MIXED, seed=4)


@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (3, 40), (0, 4)])
def test_nbits_matches_reference_and_the_dequantize_graph(adapter, shape):
    model = build_model(adapter, precision="int8", ort_nbits=True)
    nbits = [n.name for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits == ["u/MatMulNBits", "w/MatMulNBits"]
    x = np.random.default_rng(sum(shape)).standard_normal((*shape, 60)).astype(np.float32)
    y = ort_run(model, x)
    assert y.shape == (*shape, 50) and y.dtype == np.float32
    if x.size:
        ref = reference(adapter, x)
        assert rel_l2(y, ref) < 2e-2  # the int8 bound (docs/precision.md)
        plain = ort_run(build_model(adapter, precision="int8"), x)
        # the same weights; the difference is MatMulNBits' int8 input blocks (accuracy_level 4)
        assert rel_l2(y, plain) < 1.5e-2


def test_nbits_only_for_int8(adapter):
    for precision in ("fp32", "fp16"):
        model = build_model(adapter, precision=precision, ort_nbits=True)
        assert not any(n.op_type == "MatMulNBits" for n in model.graph.node)


def test_nbits_weights_decode_to_the_dequantized_tiles(adapter, tmp_path):
    export_onnx(adapter, tmp_path / "n.onnx", precision="int8", ort_nbits=True)
    export_onnx(adapter, tmp_path / "d.onnx", precision="int8")
    meta = read_metadata(__import__("onnx").load(str(tmp_path / "n.onnx")))
    assert [p.get("nbits_weight") is not None for p in meta["pipes"]] == [True, False, False, True]
    got = AdapterGraph(tmp_path / "n.onnx", "cpu").stored_tiles()
    want = AdapterGraph(tmp_path / "d.onnx", "cpu").stored_tiles()
    for i in (0, 3):
        R, C = MIXED.pipes[i].grid
        tr, tc = MIXED.pipes[i].tile
        g, w = got[i].reshape(R, C, tr, tc), want[i].reshape(R, C, tr, tc)
        rows = min(50 - (R - 1) * tr, tr)  # rows past out_dim are not kept by MatMulNBits
        np.testing.assert_array_equal(g[:-1], w[:-1])
        np.testing.assert_array_equal(g[-1, :, :rows], w[-1, :, :rows])
