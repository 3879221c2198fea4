"""The sparse gated forms: "sparse" gathers only the tiles some token selected (each once) and
multiplies them; "grouped" multiplies each tile by only the tokens that selected it. Both must
equal the reference like forms A and B, in every precision, for awkward shapes (padded tiles,
top_k of 1 and of every worker, one token, many tokens)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.lower import build_model, read_metadata
from prism_deploy.reference import random_adapter
from tests.lower_helpers import ort_run, reference, rel_l2, selections_agree

# padded tiles (in 23 -> 3 col-blocks of 9, out 17 -> 4 row-blocks of 5), top_k 1 and all
SHAPES = {
    "top1": AdapterConfig(23, 17, (PipeSpec("g", (4, 3), (5, 9), 1, 2.5),)),
    "all": AdapterConfig(
        23, 17, (PipeSpec("g", (4, 3), (5, 9), 12), PipeSpec("u", (1, 1), (17, 23), None)), "weighted"
    ),
    "mixed": AdapterConfig(
        40,
        24,
        (
            PipeSpec("a", (3, 5), (8, 8), 4, 0.5),
            PipeSpec("b", (2, 2), (12, 20), 2),
            PipeSpec("c", (1, 1), (24, 40), None),
        ),
        "weighted",
    ),
}
BOUNDS = {"fp32": 1e-5, "fp16": 2e-3, "int8": 2e-2}
TOKENS = [(1, 1), (2, 3), (4, 40)]  # one token, a few, many (every tile selected by someone)


@pytest.mark.parametrize("form", ["sparse", "grouped"])
@pytest.mark.parametrize("precision", sorted(BOUNDS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_sparse_matches_reference(shape, precision, form):
    cfg = SHAPES[shape]
    adapter = random_adapter(cfg, seed=7)
    model = build_model(adapter, precision=precision, gated_form=form)
    onnx.checker.check_model(model, full_check=True)
    meta = read_metadata(model)
    assert [p["form"] for p in meta["pipes"] if p["gated"]] == [form] * sum(p.gated for p in cfg.pipes)
    for b, s in TOKENS:
        x = np.random.default_rng(b * 10 + s).standard_normal((b, s, cfg.in_dim)).astype(np.float32)
        assert selections_agree(adapter, model, x)
        assert rel_l2(ort_run(model, x), reference(adapter, x)) < BOUNDS[precision]


def test_sparse_gathers_only_the_union_of_selections():
    """The gathered tiles are exactly the workers some token selected, ascending, each once."""
    cfg = AdapterConfig(32, 32, (PipeSpec("g", (4, 4), (8, 8), 3),))
    adapter = random_adapter(cfg, seed=1)
    model = build_model(adapter, precision="fp32", gated_form="sparse")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info("g/select/indices"))
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info("g/gate/topk_indices"))
    from prism_deploy.core.ort_session import make_session

    sess = make_session(probe.SerializeToString(), "cpu", intra_op_threads=1)
    for t in (1, 2, 5):
        x = np.random.default_rng(t).standard_normal((1, t, 32)).astype(np.float32)
        sel, topk = sess.run(["g/select/indices", "g/gate/topk_indices"], {"hidden": x})
        assert sel.tolist() == sorted(set(topk.ravel().tolist()))


def test_sparse_int8_keeps_tiles_int8_in_storage_order():
    cfg = SHAPES["mixed"]
    model = build_model(random_adapter(cfg, seed=2), precision="int8", gated_form="sparse")
    inits = {i.name: i for i in model.graph.initializer}
    for p in read_metadata(model)["pipes"]:
        if p["gated"]:
            tiles = inits[p["tiles"]]
            assert tiles.data_type == onnx.TensorProto.INT8
            assert list(tiles.dims) == [p["R"] * p["C"] * p["tr"], p["tc"]]
    # dequantized after the gather: the Gather reads the int8 tensor
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.name.endswith("tiles/Gather")]
    assert gathers and all("tiles/Reshape" in n.input[0] for n in gathers)


def test_grouped_multiplies_each_tile_by_its_own_tokens_only():
    """The group table holds, per tile, exactly the tokens that selected it, then the zero row."""
    cfg = AdapterConfig(32, 32, (PipeSpec("g", (4, 4), (8, 8), 3),))
    model = build_model(random_adapter(cfg, seed=1), precision="fp32", gated_form="grouped")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in ("g/group/table", "g/gate/topk_indices"):
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    from prism_deploy.core.ort_session import make_session

    sess = make_session(probe.SerializeToString(), "cpu", intra_op_threads=1)
    for t in (1, 3, 9):
        x = np.random.default_rng(t).standard_normal((1, t, 32)).astype(np.float32)
        table, topk = sess.run(["g/group/table", "g/gate/topk_indices"], {"hidden": x})
        counts = [int((topk == w).sum()) for w in range(16)]
        assert table.shape == (16, max(counts))
        for w in range(16):
            want = sorted(int(tok) for tok in np.nonzero((topk == w).any(axis=1))[0])
            assert table[w].tolist() == want + [t] * (max(counts) - len(want))
