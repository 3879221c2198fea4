"""A last model's KV-cache graph computes logits at the positions its caller reads
(prism_deploy.models.logits_positions, docs/model-forms.md "Prefill logits").

``logits_start`` (an overridable initializer, default 0) slices the LM head's input: fed -k the
graph gives the last k positions' logits, equal to the same positions of the full output at
every precision, left padding included, with the same KV cache; not fed, every position as
before. Generation asks for the last position only and decodes token for token as before.
"""

from __future__ import annotations

import numpy as np
import pytest

from prism_deploy.core.ort_session import make_session
from prism_deploy.format.model_folder import LOGITS_START, past_names, read_model_json
from prism_deploy.runtime.model_stage import ModelStage

# how close the last position's logits come to the full output's (the head's MatMul on one row
# against many: the same products, summed in a kernel-dependent order)
CLOSE = {"fp32": 1e-5, "fp16": 2e-3, "int8": 1e-4, "int4": 1e-4}


@pytest.fixture(scope="module")
def lasts(zoo, tmp_path_factory):
    """Model B (the tiny Qwen2, last role) at every precision the portable form exports."""
    from prism_deploy.models.lm_export import export_model

    root = tmp_path_factory.mktemp("lasts")
    out = {"fp32": zoo["B"]}
    for precision in ("fp16", "int8", "int4"):
        out[precision] = root / precision
        export_model(zoo["qwen2"], "last", out[precision], precision=precision, max_seq=64)
    return out


def _left_padded(batch: int, seq: int, width: int, dtype=np.float32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[-1, : seq // 3] = 0
    return rng.normal(0, 0.05, (batch, seq, width)).astype(dtype), mask


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int4"])
def test_logits_start_gives_the_last_positions_of_the_full_output(lasts, precision):
    folder = lasts[precision]
    manifest = read_model_json(folder)
    session = make_session(folder / manifest["files"]["graph_with_past"]["name"], "cpu")
    # an optional input: not among the inputs a caller must feed (Triton's configs, the portable callers)
    assert LOGITS_START not in {i.name for i in session.get_inputs()}
    assert [i.name for i in session.get_overridable_initializers()] == [LOGITS_START]
    assert manifest["io"]["with_past"]["optional_inputs"] == {LOGITS_START: [1]}
    dims = manifest["dims"]
    dtype = np.float16 if precision == "fp16" else np.float32
    names = past_names(dims["layers"])
    presents = past_names(dims["layers"], "present")
    emb, mask = _left_padded(3, 9, dims["hidden"], dtype, seed=1)
    past = {n: np.zeros((3, dims["kv_heads"], 0, dims["head_dim"]), dtype=dtype) for n in names}
    start = 0
    for stop in (7, 8, 9):  # a left-padded prefill, then steps of 1 and 2 new tokens
        feeds = {"inputs_embeds": emb[:, start:stop], "attention_mask": mask[:, :stop], **past}
        full = session.run(["logits", *presents], feeds)
        for keep in (1, 2):
            part = session.run(["logits", *presents], {**feeds, LOGITS_START: np.array([-keep], np.int64)})
            assert part[0].shape == (3, min(keep, stop - start), dims["vocab"])
            np.testing.assert_allclose(
                part[0].astype(np.float32),
                full[0][:, -part[0].shape[1] :].astype(np.float32),
                rtol=CLOSE[precision],
                atol=CLOSE[precision],
            )
            for got, want in zip(part[1:], full[1:]):  # the cache does not depend on which logits are asked
                np.testing.assert_array_equal(got, want)
        past = dict(zip(names, full[1:]))
        start = stop


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_generation_asks_for_the_last_position_and_decodes_as_before(lasts, precision, monkeypatch):
    stage = ModelStage(lasts[precision])
    session = make_session(lasts[precision] / "last_with_past.onnx", "cpu")
    shapes = []
    run_device = stage.past_graph.run_device

    def recorded(feeds, outputs=None):
        outs = run_device(feeds, outputs)
        shapes.append(tuple(outs[0].shape()))
        return outs

    monkeypatch.setattr(stage.past_graph, "run_device", recorded)
    table = stage.embed_tokens
    emb, mask = _left_padded(2, 7, stage.hidden_size, seed=2)
    names = past_names(stage.layers)
    # the graph as it was called before: every position, the last read out
    old_past = {n: np.zeros((2, stage.kv_heads, 0, stage.head_dim), np.float32) for n in names}
    logits, past = stage.step(emb, mask, stage.empty_past(2))
    step_emb = emb
    for _ in range(5):
        outs = session.run(None, {"inputs_embeds": step_emb, "attention_mask": mask, **old_past})
        np.testing.assert_allclose(logits, outs[0][:, -1], rtol=CLOSE[precision], atol=CLOSE[precision])
        token = logits.argmax(-1)
        assert (token == outs[0][:, -1].argmax(-1)).all()  # token for token
        old_past = dict(zip(names, outs[1:]))
        step_emb = np.asarray(table[token])[:, None, :]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        logits, past = stage.step(step_emb, mask, past)
    assert shapes[0] == (2, 1, stage.vocab)  # the prefill ran the LM head on the last position only
    # plain calls (parity, perplexity) and a step asking for every position still get them all
    assert stage.run(emb, mask[:, :7]).shape == (2, 7, stage.vocab)
    every, _ = stage.step(emb, mask[:, :7], stage.empty_past(2), positions="all")
    assert every.shape == (2, 7, stage.vocab) and shapes[-1] == (2, 7, stage.vocab)
    first, _ = stage.step(emb, mask[:, :7], stage.empty_past(2))
    np.testing.assert_allclose(first, every[:, -1], rtol=CLOSE[precision], atol=CLOSE[precision])


def test_portable_graph_with_logits_start_stays_what_tensorrt_parses(zoo):
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (its parser runs without a GPU) is not installed")
    from prism_deploy.trt.engine import parse_network

    path = zoo["B"] / "last_with_past.onnx"
    _, network, _ = parse_network(path, trt_module=trt)
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    assert inputs == {i.name for i in make_session(path, "cpu").get_inputs()}  # imported as a weight


def test_the_edit_refuses_a_graph_without_an_lm_head(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from prism_deploy.core.errors import CheckFailed
    from prism_deploy.models.logits_positions import add_logits_start

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["logits"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(tmp_path / "g.onnx"))
    before = (tmp_path / "g.onnx").read_bytes()
    with pytest.raises(CheckFailed, match="written by Relu, not an LM head"):
        add_logits_start(tmp_path / "g.onnx")
    assert (tmp_path / "g.onnx").read_bytes() == before
