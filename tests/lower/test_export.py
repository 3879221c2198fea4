"""Lowering to ONNX: structure, metadata contract, and numerics against the reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.onnx_io import IR_VERSION, OPSET
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.lower import build_model, export_onnx, read_metadata
from prism_deploy.reference import random_adapter
from tests.lower_helpers import ort_run, reference, rel_l2, selections_agree

MIXED = AdapterConfig(
    50,
    37,
    (
        PipeSpec("dense", (3, 2), (13, 26), None),
        PipeSpec("dense two", (2, 3), (19, 17), None),
        PipeSpec("routed", (4, 3), (10, 20), 5, 1.5),
        PipeSpec("coarse", (2, 2), (20, 25), 2),
    ),
    "weighted",
)


@pytest.fixture(scope="module")
def mixed():
    return random_adapter(MIXED, seed=3)


def _x(in_dim, b=2, s=3, seed=0):
    return np.random.default_rng(seed).standard_normal((b, s, in_dim)).astype(np.float32)


@pytest.mark.parametrize("form", ["auto", "A", "B", "sparse", "grouped"])
def test_fp32_matches_reference_every_form(mixed, form):
    model = build_model(mixed, precision="fp32", gated_form=form)
    x = _x(50)
    assert rel_l2(ort_run(model, x), reference(mixed, x)) < 1e-5


@pytest.mark.parametrize("precision,bound", [("fp16", 2e-3), ("int8", 2e-2)])
@pytest.mark.parametrize("io_dtype", ["float32", "float16"])
def test_reduced_precisions_match_reference(mixed, precision, bound, io_dtype):
    model = build_model(mixed, precision=precision, io_dtype=io_dtype)
    x = _x(50).astype(io_dtype)
    y = ort_run(model, x)
    assert y.dtype == np.dtype(io_dtype)
    assert selections_agree(mixed, model, x)
    assert rel_l2(y, reference(mixed, x)) < max(bound, 1e-3 if io_dtype == "float16" else 0)


def test_int8_qdq_needs_calibration(mixed):
    with pytest.raises(PrismInputError, match="--calib"):
        build_model(mixed, precision="int8-qdq")
    with pytest.raises(PrismInputError, match=r"\[n, 50\]"):
        build_model(mixed, precision="int8-qdq", calib=np.zeros((4, 7), np.float32))


@pytest.mark.parametrize("calibrator", ["max", "percentile"])
def test_int8_qdq_calibrated(mixed, calibrator):
    calib = np.random.default_rng(5).standard_normal((300, 50)).astype(np.float32)
    model = build_model(mixed, precision="int8-qdq", calib=calib, calibrator=calibrator)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 4  # one activation Q/DQ per pipe's MatMul
    scales = {
        i.name: float(onnx.numpy_helper.to_array(i)) for i in model.graph.initializer if i.name.endswith("act_scale")
    }
    assert len(scales) == 4 and all(0 < s < 1 for s in scales.values())
    x = _x(50, seed=9)
    assert rel_l2(ort_run(model, x), reference(mixed, x)) < 5e-2


def test_metadata_contract(mixed):
    model = build_model(mixed, precision="int8")
    meta = read_metadata(model)
    assert meta["version"] == 1 and meta["precision"] == "int8" and meta["compute_dtype"] == "float16"
    assert (meta["in_dim"], meta["out_dim"]) == (50, 37)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    produced = {o for n in model.graph.node for o in n.output}
    assert meta["hidden_2d"] in produced
    for p, spec in zip(meta["pipes"], MIXED.pipes):
        assert (p["R"], p["C"], p["tr"], p["tc"], p["top_k"]) == (*spec.grid, *spec.tile, spec.top_k)
        W = spec.workers
        tiles = inits[p["tiles"]]
        assert tiles.dtype == np.int8 and tiles.size == W * spec.tile_rows * spec.tile_cols
        scales = inits[p["scales"]]
        assert scales.dtype == np.float32 and scales.size == W * spec.tile_rows
        # storage order: dequantized tiles reproduce the adapter's tiles row by row
        deq = tiles.reshape(W, *spec.tile).astype(np.float32) * scales.reshape(W, spec.tile_rows, 1)
        ref = mixed.pipe_list()[p["index"]].tiles.numpy()
        assert np.abs(deq - ref).max() <= np.abs(ref).max() / 127 * 0.51 + 1e-7
        assert p["output"] in produced
        assert all(n.startswith(p["node_prefix"]) for n in nodes if n.startswith(p["node_prefix"]))
        if spec.gated:
            assert nodes[p["node_prefix"] + "gate/MatMul"].op_type == "MatMul"
            assert nodes[p["node_prefix"] + "gate/Add"].output[0] == p["scores"]
            topk = nodes[p["node_prefix"] + "gate/TopK"]
            assert {a.name: a.i for a in topk.attribute} == {"axis": -1, "largest": 1, "sorted": 1}
    assert meta["pipes"][1]["node_prefix"] == "dense_two/"  # sanitized


def test_int8_scales_per_tile_row():
    """A tile whose rows differ in size keeps each row's own scale (max|row| / 127)."""
    cfg = AdapterConfig(4, 2, (PipeSpec("p", (1, 1), (2, 4), None),))
    a = random_adapter(cfg, seed=0)
    a.pipe_list()[0].tiles.data = torch.tensor([[[1.0, -2.0, 0.5, 0.0], [0.001, 0.0, -0.002, 0.0005]]])
    meta = read_metadata(model := build_model(a, precision="int8"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_allclose(inits[meta["pipes"][0]["scales"]], [2.0 / 127, 0.002 / 127], rtol=1e-6)
    assert inits[meta["pipes"][0]["tiles"]].tolist() == [[64, -127, 32, 0], [64, 0, -127, 32]]


def test_fp32_folds_consecutive_ungated_pipes(mixed):
    meta = read_metadata(build_model(mixed, precision="fp32"))
    dense, two = meta["pipes"][0], meta["pipes"][1]
    assert dense["folded_into"] == two["folded_into"] == "fold0/"
    assert dense["dense_weight"] == two["dense_weight"] and dense["output"] is None
    assert meta["pipes"][2]["tiles"] == "routed/tiles"


def test_node_count_independent_of_workers():
    counts = set()
    for grid, top_k in [((1, 2), 1), ((4, 4), 3), ((16, 32), 100)]:
        cfg = AdapterConfig(
            64,
            64,
            (
                PipeSpec("g", grid, (64 // grid[0], 64 // grid[1]), top_k),
                PipeSpec("u", grid, (64 // grid[0], 64 // grid[1]), None),
            ),
        )
        for precision in ("fp32", "int8"):
            counts.add((precision, len(build_model(random_adapter(cfg), precision=precision).graph.node)))
    assert len({c for c in counts if c[0] == "fp32"}) == 1 and len({c for c in counts if c[0] == "int8"}) == 1


def test_export_writes_checked_model(tmp_path, mixed):
    res = export_onnx(mixed, tmp_path / "m.onnx", precision="fp16")
    assert res.paths == [str(tmp_path / "m.onnx")] and res.bytes == (tmp_path / "m.onnx").stat().st_size
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert model.ir_version == IR_VERSION <= 9
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    out = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in out] == ["batch", "seq", 37]
    assert res.metadata == read_metadata(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # nothing half-written left


def test_bad_options(mixed):
    with pytest.raises(PrismInputError, match="--precision"):
        build_model(mixed, precision="int4")
    with pytest.raises(PrismInputError, match="--io-dtype"):
        build_model(mixed, io_dtype="bfloat16")


def test_ties_and_negative_scores_select_lower_index():
    """All-equal and all-negative gate scores: TopK keeps the lower worker index first."""
    cfg = AdapterConfig(8, 8, (PipeSpec("g", (2, 4), (4, 2), 3),))
    a = random_adapter(cfg, seed=1)
    a.pipe_list()[0].gate.weight.data.zero_()
    a.pipe_list()[0].gate.bias.data.fill_(-5.0)
    model = build_model(a)
    x = _x(8)
    assert selections_agree(a, model, x)
    assert rel_l2(ort_run(model, x), reference(a, x)) < 1e-6


def test_loads_from_file_on_installed_onnxruntime(tmp_path, mixed):
    import onnxruntime as ort

    from prism_deploy.core.ort_session import make_session

    export_onnx(mixed, tmp_path / "m.onnx", precision="int8")
    sess = make_session(tmp_path / "m.onnx", "cpu")  # raises PrismInputError if refused
    assert ort.__version__.split(".")[:2] >= ["1", "18"]
    x = _x(50)
    y = sess.run(["adapted"], {"hidden": x})[0]
    assert rel_l2(y, reference(mixed, x)) < 2e-2


def test_batch_invariance(mixed):
    """A token's output does not depend on which tokens share its batch."""
    model = build_model(mixed, precision="fp16")
    x = _x(50, b=3, s=5, seed=4)
    whole = ort_run(model, x)
    for b in range(3):
        for s in range(5):
            alone = ort_run(model, x[b : b + 1, s : s + 1])
            np.testing.assert_allclose(alone[0, 0], whole[b, s], rtol=2e-3, atol=2e-3)


def test_external_data_model_runs_in_ort_runner(tmp_path, mixed):
    from prism_deploy.core.onnx_io import save_model
    from prism_deploy.runtime.adapter_session import AdapterGraph

    written = save_model(build_model(mixed, precision="fp32"), tmp_path / "ext.onnx", external=True)
    assert [p.name for p in written] == ["ext.onnx", "ext.onnx.data"]
    runner = AdapterGraph(tmp_path / "ext.onnx")
    x = _x(50)
    y, sel = runner.run_with_selections(x)
    assert rel_l2(y, reference(mixed, x)) < 1e-5 and set(sel) == {2, 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]  # temp file gone
    tiles = runner.stored_tiles()
    assert set(tiles) == {2, 3}  # pipes 0 and 1 are folded
    np.testing.assert_array_equal(tiles[2], mixed.pipe_list()[2].tiles.numpy())


def test_tiles_from_dense_inverts_the_permutation():
    from prism_deploy.core.tiles import dense_from_tiles
    from prism_deploy.runtime.adapter_session import AdapterGraph

    cfg = AdapterConfig(30, 20, (PipeSpec("u", (3, 4), (7, 8), None),))
    a = random_adapter(cfg, seed=2)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        export_onnx(a, Path(d) / "u.onnx")
        got = AdapterGraph(Path(d) / "u.onnx").stored_tiles()[0]
    # cropped-away padding comes back as zeros; the rest is the tiles exactly
    ref = a.pipe_list()[0].dense_weight()
    dense = dense_from_tiles(torch.from_numpy(got), cfg.pipes[0].grid, cfg.pipes[0].tile)
    torch.testing.assert_close(dense[:20, :30], ref[:20, :30], rtol=0, atol=0)


def test_pipe_prefixes_are_unique_and_clean():
    from prism_deploy.lower.adapter_onnx import pipe_prefixes

    got = pipe_prefixes(["a_2", "a", "a", "input", "fold0", "x/y z", "", "a b"])
    assert got == ["a_2/", "a/", "a_3/", "input_3/", "fold0_4/", "x_y_z/", "pipe/", "a_b/"]
    assert len(set(got)) == len(got)


def test_float16_range_is_checked():
    cfg = AdapterConfig(4, 4, (PipeSpec("p", (1, 1), (4, 4), None),))
    a = random_adapter(cfg, seed=0)
    a.pipe_list()[0].tiles.data[0, 1, 2] = 1e5
    build_model(a, precision="fp32")  # fine in float32
    for precision in ("fp16", "int8"):
        with pytest.raises(PrismInputError, match=r"pipes\.0\.tiles.*float16 range"):
            build_model(a, precision=precision)
