"""int4 adapters: ungated pipes as MatMulNBits bits=4 and gated pipes in the sparse form
(GatherBlockQuantized), whose weights really are 4-bit, within the int4 tolerance of the float
reference and close to the reference on the int4-rounded tiles on awkward shapes; what int4
does not cover is refused."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.precision import Precision
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
        (PipeSpec("g", (2, 3), (25, 20), 2), "pipe 'g' has tile width 20"),
        (PipeSpec("odd", (2, 3), (25, 20), None), "pipe 'odd' has tile width 20"),
        (PipeSpec("narrow", (2, 8), (25, 8), None), "pipe 'narrow' has tile width 8"),
    ],
)
def test_int4_refuses_what_matmulnbits_cannot_take(pipe, why):
    cfg = AdapterConfig(60, 50, (pipe,), "sum")
    with pytest.raises(PrismInputError, match=f"--precision int4: {why}"):
        build_model(random_adapter(cfg, seed=0), precision="int4")


def test_cli_export_and_build_int4_on_ort_cpu(adapter, tmp_path, capsys):
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
    assert main(["export", str(demo), "-o", str(tmp_path / "d.onnx"), "--precision", "int4"]) == 0
    assert main(["build", str(demo), "-o", str(tmp_path / "demo"), "--target", "ort-cpu", "--precision", "int4"]) == 0
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    (engine,) = manifest["engines"]
    assert engine["parity"]["passed"] and engine["forms"]["candidates"] == ["A", "B", "sparse", "grouped"]
    meta = AdapterGraph(tmp_path / "d.onnx", "cpu").metadata
    assert meta is not None and [p["form"] for p in meta["pipes"] if p["gated"]] == ["sparse", "sparse"]


def test_simulated_stored_tiles_are_the_graphs(adapter, tmp_path):
    from prism_deploy.core.tiles import stored_as

    export_onnx(adapter, tmp_path / "a.onnx", precision="int4")
    got = AdapterGraph(tmp_path / "a.onnx", "cpu").stored_tiles()
    for i, pipe in enumerate(UNGATED.pipes):
        (R, C), (tr, tc) = pipe.grid, pipe.tile
        want = stored_as(adapter.pipes[i].tiles, Precision.INT4).reshape(R, C, tr, tc)
        rows = min(50 - (R - 1) * tr, tr)
        np.testing.assert_array_equal(got[i].reshape(R, C, tr, tc)[-1, :, :rows], want[-1, :, :rows])
        np.testing.assert_array_equal(got[i].reshape(R, C, tr, tc)[:-1], want[:-1])


# ---- gated pipes: the sparse form, tiles gathered at 4 bits -------------------------------------

# in_dim 60 / out_dim 50: both gated grids overhang both dims; "one" picks 1 of 12 workers, "all"
# every one of its 4 (top_k = all workers)
GATED = AdapterConfig(
    60,
    50,
    (PipeSpec("one", (3, 4), (17, 16), 1), PipeSpec("all", (2, 2), (25, 32), 4)),
    "weighted",
)
WITH_UNGATED = AdapterConfig(
    60,
    50,
    (PipeSpec("u", (3, 4), (17, 16), None), PipeSpec("g", (2, 2), (25, 32), 2)),
    "sum",
)
SHAPES = [(1, 1), (2, 5), (3, 40), (0, 4), (2, 0)]


def _int4_rounded(adapter):
    """The reference on the tiles as int4 stores them (parity's ``stored_as``)."""
    import copy

    import torch

    from prism_deploy.core.tiles import stored_as

    sim = copy.deepcopy(adapter)
    with torch.no_grad():
        for pipe in sim.pipe_list():
            pipe.tiles.copy_(torch.from_numpy(stored_as(pipe.tiles, Precision.INT4)))
    return sim


@pytest.fixture(scope="module")
def gated():
    return random_adapter(GATED, seed=11)


@pytest.mark.parametrize("form", ["auto", "A", "B", "sparse", "grouped"])
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_gated_matches_the_reference_and_the_int4_rounded_one(gated, form, shape):
    from tests.lower_helpers import selections_agree

    model = build_model(gated, precision="int4", gated_form=form)
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == "prism.lowering"))
    assert [p["form"] for p in meta["pipes"]] == [form if form != "auto" else "sparse"] * 2  # auto: sparse
    x = np.random.default_rng(sum(shape) + 1).standard_normal((*shape, 60)).astype(np.float32)
    y = ort_run(model, x)
    assert y.shape == (*shape, 50) and y.dtype == np.float32
    if not x.size:
        return
    assert selections_agree(gated, model, x)
    ref = reference(gated, x)
    assert rel_l2(y, ref) < BOUND.rel_l2_max
    yy, rr = y.reshape(-1, 50), ref.reshape(-1, 50)
    cos = (yy * rr).sum(-1) / np.linalg.norm(yy, axis=-1) / np.linalg.norm(rr, axis=-1)
    assert cos.min() > BOUND.cosine_min
    # the same tiles as the int4-rounded reference: what is left is float16 compute (sparse: float32
    # products, float16 sums), within fp16's bound, not int4's rounding
    assert rel_l2(y, reference(_int4_rounded(gated), x)) < ADAPTER["fp16"].rel_l2_max
    assert rel_l2(y, ref) > 10 * ADAPTER["fp16"].rel_l2_max  # and the rounding is really 4-bit


def test_int4_with_an_ungated_pipe_beside_a_gated_one():
    adapter = random_adapter(WITH_UNGATED, seed=12)
    model = build_model(adapter, precision="int4")
    assert sorted(n.op_type for n in model.graph.node if n.domain == "com.microsoft") == [
        "GatherBlockQuantized",
        "MatMulNBits",
    ]
    x = np.random.default_rng(0).standard_normal((2, 30, 60)).astype(np.float32)
    y = ort_run(model, x)
    assert rel_l2(y, reference(adapter, x)) < BOUND.rel_l2_max
    # MatMulNBits at accuracy level 4 also rounds its input to int8 per block: int8's bound
    assert rel_l2(y, reference(_int4_rounded(adapter), x)) < ADAPTER["int8"].rel_l2_max


def test_int4_gated_tiles_are_packed_and_gathered_at_four_bits(gated, tmp_path):
    model = build_model(gated, precision="int4")
    inits = {t.name: t for t in model.graph.initializer}
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == "prism.lowering"))
    for pipe in meta["pipes"]:
        tiles = inits[pipe["tiles"]]
        assert tiles.data_type == onnx.TensorProto.UINT8
        assert list(tiles.dims) == [pipe["R"] * pipe["C"] * pipe["tr"], pipe["tc"] // 2]  # two codes a byte
        assert list(inits[pipe["scales"]].dims) == [pipe["R"] * pipe["C"] * pipe["tr"]]
        (gbq,) = [n for n in model.graph.node if n.name == f"{pipe['node_prefix']}tiles/GatherBlockQuantized"]
        assert gbq.input[1] == f"{pipe['node_prefix']}select/indices"  # the union of the selections
        assert {a.name: a.i for a in gbq.attribute} == {
            "gather_axis": 0,
            "quantize_axis": 2,
            "block_size": pipe["tc"],
            "bits": 4,
        }
    # no float copy of any tile: the only float tile initializers are the scales
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    float_tiles = [t.name for t in model.graph.initializer if t.data_type in floats and "tiles" in t.name]
    assert sorted(float_tiles) == sorted(p["scales"] for p in meta["pipes"])
    # what the graph stores decodes to exactly the int4-rounded tiles
    export_onnx(gated, tmp_path / "g.onnx", precision="int4")
    got = AdapterGraph(tmp_path / "g.onnx", "cpu").stored_tiles()
    want = _int4_rounded(gated)
    for i, pipe in enumerate(want.pipe_list()):
        np.testing.assert_array_equal(got[i], pipe.tiles.detach().numpy())


def test_pack_int4_is_the_layout_matmulnbits_reads():
    from prism_deploy.core.tiles import pack_int4, unpack_int4

    codes = np.array([[-7, 7, 0, 1, -1, 3]], dtype=np.int8)
    packed = pack_int4(codes)
    # q + 8, the even element in the low nibble: (-7+8) | (7+8) << 4 = 0xF1, ...
    assert packed.dtype == np.uint8 and packed.tolist() == [[0xF1, 0x98, 0xB7]]
    np.testing.assert_array_equal(unpack_int4(packed), codes.astype(np.float32))


@pytest.mark.parametrize(("target", "plugin"), [("trt", False), ("trt", True), ("ort-cuda", False)])
def test_int4_targets_without_matmulnbits_still_refuse(gated, tmp_path, target, plugin):
    """int4 lives in ONNX Runtime CPU's contrib ops: the other targets refuse it, gated pipes or not."""
    from prism_deploy.builder.adapter_source import export_graph
    from prism_deploy.builder.options import EngineConfig, Profile

    cfg = EngineConfig(target, "int4", Profile(), plugin=plugin)
    with pytest.raises(PrismInputError, match=f"^--precision int4: target {target} has no MatMulNBits"):
        export_graph(gated.arrays(), tmp_path / "a.onnx", cfg, None)
    assert not (tmp_path / "a.onnx").exists()
