"""int4 adapters: ungated pipes as MatMulNBits bits=4 whose weights really are 4-bit, within the
int4 tolerance of the float reference on awkward shapes; what int4 does not cover is refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.tolerances import ADAPTER
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.lower import build_model, export_onnx
from prism_deploy.reference import random_adapter
from prism_deploy.runtime.adapter_session import AdapterGraph
from tests.lower_helpers import ort_run, reference, rel_l2

# in_dim 60: the last 16-wide block of "u" is partly padding; out_dim 50 crops both pipes' rows
UNGATED = AdapterConfig(
    60,
    50,
    (PipeSpec("u", (3, 4), (17, 16), None), PipeSpec("w", (2, 2), (25, 32), None)),
    "weighted",
)
BOUND = ADAPTER["int4"]


@pytest.fixture(scope="module")
def adapter():
    return random_adapter(UNGATED, seed=7)


@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (3, 40), (0, 4), (2, 0)])
def test_int4_matches_reference_within_its_tolerance(adapter, shape):
    model = build_model(adapter, precision="int4")
    x = np.random.default_rng(sum(shape)).standard_normal((*shape, 60)).astype(np.float32)
    y = ort_run(model, x)
    assert y.shape == (*shape, 50) and y.dtype == np.float32
    if x.size:
        ref = reference(adapter, x)
        assert rel_l2(y, ref) < BOUND.rel_l2_max
        yy, rr = y.reshape(-1, 50), ref.reshape(-1, 50)
        cos = (yy * rr).sum(-1) / np.linalg.norm(yy, axis=-1) / np.linalg.norm(rr, axis=-1)
        assert cos.min() > BOUND.cosine_min
        # and it is not int8: 4-bit rounding is visibly coarser
        assert rel_l2(y, ort_run(build_model(adapter, precision="int8", ort_nbits=True), x)) > 1e-2


def test_int4_weights_are_four_bit(adapter):
    model = build_model(adapter, precision="int4")
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert [n.name for n in nodes] == ["u/MatMulNBits", "w/MatMulNBits"]
    inits = {t.name: t for t in model.graph.initializer}
    for node, (tc, blocks) in zip(nodes, [(16, 4), (32, 2)], strict=True):
        assert {a.name: a.i for a in node.attribute}["bits"] == 4
        w = inits[node.input[1]]
        assert w.data_type == onnx.TensorProto.UINT8
        assert list(w.dims) == [50, blocks, tc // 2]  # two 4-bit codes per byte
    assert not any(n.op_type in ("MatMul", "DequantizeLinear") for n in model.graph.node)


def test_int4_stored_tiles_decode_to_the_rounded_tiles(adapter, tmp_path):
    export_onnx(adapter, tmp_path / "a.onnx", precision="int4")
    got = AdapterGraph(tmp_path / "a.onnx", "cpu").stored_tiles()
    for i, pipe in enumerate(UNGATED.pipes):
        (R, C), (tr, tc) = pipe.grid, pipe.tile
        tiles = adapter.pipes[i].tiles.detach().numpy().reshape(R * C * tr, tc)
        scale = np.abs(tiles).max(-1, keepdims=True) / 7
        want = (np.clip(np.rint(tiles / scale), -7, 7) * scale).reshape(R, C, tr, tc)
        g = got[i].reshape(R, C, tr, tc)
        rows = min(50 - (R - 1) * tr, tr)  # rows past out_dim are not kept by MatMulNBits
        np.testing.assert_allclose(g[:-1], want[:-1], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(g[-1, :, :rows], want[-1, :, :rows], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("pipe", "why"),
    [
        (PipeSpec("g", (2, 2), (25, 32), 2), "pipe 'g' is gated"),
        (PipeSpec("odd", (2, 3), (25, 20), None), "pipe 'odd' has tile width 20"),
        (PipeSpec("narrow", (2, 8), (25, 8), None), "pipe 'narrow' has tile width 8"),
    ],
)
def test_int4_refuses_what_matmulnbits_cannot_take(pipe, why):
    cfg = AdapterConfig(60, 50, (pipe,), "sum")
    with pytest.raises(PrismInputError, match=f"--precision int4: {why}"):
        build_model(random_adapter(cfg, seed=0), precision="int4")


def test_cli_export_and_build_int4_on_ort_cpu(adapter, tmp_path, capsys):
    import json
    from pathlib import Path

    from prism_deploy.cli.main import main
    from prism_deploy.reference import save_adapter

    src = tmp_path / "a.safetensors"
    save_adapter(adapter, src)
    assert main(["export", str(src), "-o", str(tmp_path / "a.onnx"), "--precision", "int4"]) == 0
    assert main(["build", str(src), "-o", str(tmp_path / "eng"), "--target", "ort-cpu", "--precision", "int4"]) == 0
    manifest = json.loads((tmp_path / "eng" / "manifest.json").read_text())
    (engine,) = manifest["engines"]
    assert engine["configuration"]["precision"] == "int4" and engine["configuration"]["target"] == "ort-cpu"
    assert engine["parity"]["passed"] and engine["parity"]["tolerances"]["rel_l2_max"] == BOUND.rel_l2_max
    capsys.readouterr()
    demo = Path(__file__).resolve().parents[2] / "examples" / "demo-adapter.safetensors"  # has gated pipes
    assert main(["export", str(demo), "-o", str(tmp_path / "d.onnx"), "--precision", "int4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --precision int4: pipe 'routed' is gated (int4 covers ungated pipes only: MatMulNBits; use int8)"
    ]


def test_simulated_stored_tiles_are_the_graphs(adapter, tmp_path):
    from prism_deploy.core.precision import Precision
    from prism_deploy.core.tiles import stored_as

    export_onnx(adapter, tmp_path / "a.onnx", precision="int4")
    got = AdapterGraph(tmp_path / "a.onnx", "cpu").stored_tiles()
    for i, pipe in enumerate(UNGATED.pipes):
        (R, C), (tr, tc) = pipe.grid, pipe.tile
        want = stored_as(adapter.pipes[i].tiles, Precision.INT4).reshape(R, C, tr, tc)
        rows = min(50 - (R - 1) * tr, tr)
        np.testing.assert_array_equal(got[i].reshape(R, C, tr, tc)[-1, :, :rows], want[-1, :, :rows])
        np.testing.assert_array_equal(got[i].reshape(R, C, tr, tc)[:-1], want[:-1])
