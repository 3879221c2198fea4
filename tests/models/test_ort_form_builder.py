"""Model graphs in memory and in their two forms (docs/model-forms.md).

- One set of weights: a last model's plain calls run its KV-cache graph with an empty past, so
  a stage holds one session, and its logits equal the plain ``last.onnx``.
- The ONNX Runtime form (``export-model --graph-form ort``, written by ONNX Runtime GenAI's
  model builder): every role equals transformers; prefill + decode on the shared, preallocated
  KV buffer equals the plain graph token by token. Skipped, with the reason, where
  ``onnxruntime_genai`` is not installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from prism_deploy.core.ort_session import make_session
from prism_deploy.runtime.model_stage import ModelStage


def _left_padded(batch: int, seq: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[-1, : seq // 3] = 0
    return rng.normal(0, 0.05, (batch, seq, width)).astype(np.float32), mask


def test_last_stage_holds_one_session_and_matches_the_plain_graph(zoo):
    stage = ModelStage(zoo["B"])
    assert stage.shares_past_graph and stage.graph is stage.past_graph  # one session, one copy of the weights
    emb, mask = _left_padded(2, 9, stage.hidden_size)
    got = stage.run(emb, mask)
    plain = make_session(zoo["B"] / "last.onnx", "cpu").run(["logits"], {"inputs_embeds": emb, "attention_mask": mask})[
        0
    ]
    real = mask.astype(bool)
    assert got.shape == plain.shape
    np.testing.assert_allclose(got[real], plain[real], rtol=1e-4, atol=1e-4)


def test_served_last_stage_is_the_runtime_stage_with_one_session(zoo):
    from prism_deploy.serving.stage_runtime import open_stage

    served = open_stage(zoo["B"], "last")
    assert isinstance(served, ModelStage)  # no serving copy of the model stage
    assert served.shares_past_graph and served.graph is served.past_graph
    emb, mask = _left_padded(2, 6, served.hidden_size)
    plain = make_session(zoo["B"] / "last.onnx", "cpu").run(["logits"], {"inputs_embeds": emb, "attention_mask": mask})[
        0
    ]
    real = mask.astype(bool)
    np.testing.assert_allclose(served.run(emb, mask)[real], plain[real], rtol=1e-4, atol=1e-4)


def test_step_gives_the_last_position_or_all_of_them(zoo):
    stage = ModelStage(zoo["B"])
    emb, mask = _left_padded(2, 6, stage.hidden_size)
    last, _ = stage.step(emb, mask, stage.empty_past(2))
    every, present = stage.step(emb, mask, stage.empty_past(2), positions="all")
    plain = make_session(zoo["B"] / "last.onnx", "cpu").run(["logits"], {"inputs_embeds": emb, "attention_mask": mask})[
        0
    ]
    assert last.shape == (2, stage.vocab) and every.shape == plain.shape
    np.testing.assert_array_equal(every[:, -1], last)
    real = mask.astype(bool)
    np.testing.assert_allclose(every[real], plain[real], rtol=1e-4, atol=1e-4)
    assert len(present) == 2 * stage.layers
    with pytest.raises(ValueError, match="positions"):
        stage.step(emb, mask, stage.empty_past(2), positions="first")


# -- the ort form ------------------------------------------------------------------------------------


def _builder_or_skip() -> None:
    from prism_deploy.models.ort_form_builder import builder_missing

    why = builder_missing()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def ort_forms(zoo, tmp_path_factory):
    """The tiny Llama (head size 16, as GroupQueryAttention needs) exported in both forms."""
    _builder_or_skip()
    from prism_deploy.models.lm_export import export_model
    from prism_deploy.models.ort_form_builder import export_ort_form

    root = tmp_path_factory.mktemp("forms")
    out = {"ort_first": root / "ort_first", "ort_last": root / "ort_last", "portable_last": root / "portable_last"}
    export_ort_form(zoo["llama"], "first", out["ort_first"], max_seq=32)
    export_ort_form(zoo["llama"], "last", out["ort_last"], max_seq=32)
    export_model(zoo["llama"], "last", out["portable_last"], max_seq=32)
    return out


def _op_types(path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.parametrize("role", ["first", "last"])
def test_ort_form_is_fused_and_matches_transformers(ort_forms, zoo, role):
    from prism_deploy.core import tolerances
    from prism_deploy.format.model_folder import read_model_json

    folder = ort_forms[f"ort_{role}"]
    manifest = read_model_json(folder)
    assert manifest["graph_form"] == "ort" and set(manifest["files"]) >= {"graph", "graph_data"}
    ops = _op_types(folder / manifest["files"]["graph"]["name"])
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert not ops & {"Softmax", "Expand", "Concat"}  # no separate softmax, K/V copy per head or cache concat
    # the export's own validation ran against transformers with a left-padded row; check its figures here too
    output = "logits" if role == "last" else "hidden_states"
    fig = manifest["validation"][output]
    assert not tolerances.model_export("fp32").failures(fig)
    # and once more through the runtime, on a left-padded batch
    import torch

    from prism_deploy.models import hf

    reference = hf.load_causal_lm(zoo["llama"], attn_implementation="eager")
    stage = ModelStage(folder)
    emb, mask = _left_padded(2, 9, 64, seed=3)
    with torch.no_grad():
        if role == "first":
            ids = np.random.default_rng(3).integers(0, 300, size=mask.shape, dtype=np.int64)
            got, want = (
                stage.run(ids, mask),
                hf.final_hidden(reference, torch.from_numpy(ids), torch.from_numpy(mask)).numpy(),
            )
        else:
            got = stage.run(emb, mask)
            want = hf.causal_lm_forward(
                reference, inputs_embeds=torch.from_numpy(emb), attention_mask=torch.from_numpy(mask)
            )[0].numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4)


def test_shared_kv_buffer_decodes_as_the_plain_graph_token_by_token(ort_forms):
    stage = ModelStage(ort_forms["ort_last"])
    portable = ModelStage(ort_forms["portable_last"])
    table = stage.embed_tokens
    emb, mask = _left_padded(2, 7, stage.hidden_size, seed=4)
    cache = stage.empty_past(2)
    buffers = dict(cache.values)
    logits, cache = stage.step(emb, mask, cache)
    past = portable.empty_past(2)
    plogits, past = portable.step(emb, mask, past)
    seq_emb, seq_mask = emb, mask
    for _ in range(6):
        plain = stage.run(seq_emb, seq_mask)[:, -1]  # the plain graph on the whole sequence so far
        np.testing.assert_allclose(logits, plain, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logits, plogits, rtol=1e-4, atol=1e-4)  # and the portable form's decoding
        token = logits.argmax(-1)
        assert (token == plogits.argmax(-1)).all()
        step = np.asarray(table[token])[:, None, :]
        seq_emb = np.concatenate([seq_emb, step], axis=1)
        seq_mask = np.concatenate([seq_mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        logits, cache = stage.step(step, seq_mask, cache)
        plogits, past = portable.step(step, seq_mask, past)
    # the same buffers all along, preallocated to max_seq and written in place up to each row's length
    assert cache.values == buffers
    key = cache.values["past_key_values.0.key"].numpy()
    assert key.shape[2] == stage.max_seq
    real = seq_mask.sum(axis=1) - 1  # the last step's own position is written by the next call only
    for row, n in enumerate(real):
        assert np.abs(key[row, :, :n]).min(axis=-1).max() > 0 and not key[row, :, n + 1 :].any()


def _assert_logits_start_selects(graph, dims, seed: int = 5) -> None:
    """The ort form's last graph fed ``logits_start`` = -k gives the full output's last k positions."""
    from prism_deploy.format.model_folder import LOGITS_START, past_names

    session = make_session(graph, "cpu")
    assert [i.name for i in session.get_overridable_initializers()] == [LOGITS_START]
    emb, mask = _left_padded(3, 8, dims["hidden"], seed=seed)
    mask = mask[:, ::-1].copy()  # GroupQueryAttention's right padding
    empty = np.zeros((3, dims["kv_heads"], 0, dims["head_dim"]), np.float32)
    feeds = {"inputs_embeds": emb, "attention_mask": mask, **{n: empty for n in past_names(dims["layers"])}}
    full = session.run(["logits"], feeds)[0]
    for keep in (1, 3):
        part = session.run(["logits"], {**feeds, LOGITS_START: np.array([-keep], np.int64)})[0]
        assert part.shape == (3, keep, dims["vocab"])
        np.testing.assert_allclose(part, full[:, -keep:], rtol=1e-4, atol=1e-4)


def test_ort_form_prefill_computes_the_logits_it_reads(ort_forms):
    from prism_deploy.format.model_folder import read_model_json

    stage = ModelStage(ort_forms["ort_last"])
    assert stage.graph.selects_positions  # the runner asks for each row's last real position only
    _assert_logits_start_selects(ort_forms["ort_last"] / "last.onnx", read_model_json(ort_forms["ort_last"])["dims"])
    # the left-padded prefill reads the same logits with and without the selection
    emb, mask = _left_padded(3, 8, stage.hidden_size, seed=6)
    picked, _ = stage.step(emb, mask, stage.empty_past(3))
    stage.graph.selects_positions = False
    every, _ = stage.step(emb, mask, stage.empty_past(3))
    np.testing.assert_allclose(picked, every, rtol=1e-5, atol=1e-5)


def test_interleaved_generations_keep_their_own_binding(ort_forms):
    """Each cache carries its own IO binding and mask buffer: two generations stepped in turn on
    one session give what each gives alone, and logits returned earlier are not overwritten."""
    stage = ModelStage(ort_forms["ort_last"])
    table = stage.embed_tokens

    def generate(emb, mask, turns):
        cache = stage.empty_past(emb.shape[0])
        logits, cache = stage.step(emb, mask, cache)
        out = [logits]
        for _ in range(turns):
            step = np.asarray(table[out[-1].argmax(-1)])[:, None, :]
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
            logits, cache = stage.step(step, mask, cache)
            out.append(logits)
        return out

    a_emb, a_mask = _left_padded(2, 6, stage.hidden_size, seed=1)
    b_emb, b_mask = _left_padded(1, 9, stage.hidden_size, seed=2)
    alone_a, alone_b = generate(a_emb, a_mask, 4), generate(b_emb, b_mask, 4)
    kept = [x.copy() for x in alone_a]
    ca, cb = stage.empty_past(2), stage.empty_past(1)
    la, ca = stage.step(a_emb, a_mask, ca)
    lb, cb = stage.step(b_emb, b_mask, cb)
    got_a, got_b = [la], [lb]
    for _ in range(4):
        for got, cache_, mask_ in ((got_a, ca, a_mask), (got_b, cb, b_mask)):
            step = np.asarray(table[got[-1].argmax(-1)])[:, None, :]
            full = np.ones((mask_.shape[0], mask_.shape[1] + len(got)), dtype=np.int64)
            full[:, : mask_.shape[1]] = mask_
            logits, _ = stage.step(step, full, cache_)
            got.append(logits)
    for got, alone in ((got_a, alone_a), (got_b, alone_b)):
        for x, y in zip(got, alone):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    for x, y in zip(alone_a, kept):  # earlier steps' logits untouched by later steps
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="a mask of 20 tokens after 13 cached and 1 new"):
        stage.step(np.asarray(table[[0]])[:, None, :], np.ones((1, 20), dtype=np.int64), cb)


@pytest.fixture(scope="module")
def ort_last_int4(zoo, tmp_path_factory):
    """The tiny Llama's last role in the ort form at int4 (the builder's MatMulNBits)."""
    _builder_or_skip()
    from prism_deploy.models.ort_form_builder import export_ort_form

    out = tmp_path_factory.mktemp("forms_int4") / "ort_last"
    export_ort_form(zoo["llama"], "last", out, precision="int4", max_seq=32)
    return out


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_decode_steps_on_the_bound_input_give_the_step_logic_logits_bit_for_bit(ort_forms, ort_last_int4, precision):
    """Decode steps past the first copy their input into a buffer the binding keeps: a long
    generation (batch 1, and batch 2 with left padding) gives bit for bit the logits of the
    step logic that binds each step's input anew, each step's logits its own array."""
    stage = ModelStage(ort_forms["ort_last"] if precision == "fp32" else ort_last_int4)
    graph, table = stage.graph, stage.embed_tokens
    for batch, seed in ((1, 11), (2, 12)):
        emb, mask = _left_padded(batch, 6, stage.hidden_size, seed=seed)
        fast, plain = graph.new_cache(batch), graph.new_cache(batch)
        got, want = [graph.step(emb, mask, fast)], [graph._step(emb, mask, plain)]
        while mask.shape[1] < graph.max_seq:
            step = np.asarray(table[want[-1].argmax(-1)])[:, None, :]
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            got.append(graph.step(step, mask, fast))
            want.append(graph._step(step, mask, plain))  # binds the input anew each step
            assert fast.bound[0] is fast.step_input  # the bound buffer, not a new input
        assert len(got) == graph.max_seq - 5
        for x, y in zip(got, want):  # kept logits untouched by later steps, and equal bit for bit
            np.testing.assert_array_equal(x, y)
        for name in graph.names:
            np.testing.assert_array_equal(fast.values[name].numpy(), plain.values[name].numpy())
        with pytest.raises(ValueError, match="33 tokens exceed the cache's 32"):
            graph.step(step, np.ones((batch, 33), dtype=np.int64), fast)


def test_ort_form_cli_refusals(ort_forms, zoo, tmp_path, capsys):
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "prism_deploy",
        "export-model",
        str(zoo["llama"]),
        "--role",
        "last",
        "-o",
        str(tmp_path / "x"),
        "--graph-form",
        "ort",
        "--precision",
        "int4",
        "--block-size",
        "64",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --graph-form ort: the quantization options are the model builder's own (block 32, symmetric, round to nearest); "
        "give only --precision"
    ]
    assert not (tmp_path / "x").exists()
    folder = ort_forms["ort_last"]
    for target, why in (
        ("trt", "TensorRT cannot parse its GroupQueryAttention"),
        ("ort-cuda", "it is written for the CPU execution provider (float32 GroupQueryAttention)"),
    ):
        cmd = [
            sys.executable,
            "-m",
            "prism_deploy",
            "build",
            "--model",
            str(folder),
            "--target",
            target,
            "-o",
            str(tmp_path / "b"),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [
            f"error: --model {folder}: the ort graph form builds for ort-cpu only, not {target}: {why}; "
            f"export --graph-form portable for {target}"
        ]
        assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("role", ["first", "last"])
def test_build_model_of_the_ort_form_runs_as_its_export(ort_forms, tmp_path, role):
    """`build --model` of an ort-form folder: the offline-optimized graph, checked against the
    folder's own graph, in a build folder that the runtime opens on the shared KV buffer."""
    from prism_deploy.cli.main import main
    from prism_deploy.format.engine_manifest import read_manifest

    out = tmp_path / "b"
    assert main(["build", "--model", str(ort_forms[f"ort_{role}"]), "--target", "ort-cpu", "-o", str(out)]) == 0
    manifest = read_manifest(out)
    assert manifest is not None and manifest["model"]["graph_form"] == "ort"
    [entry] = manifest["engines"]  # one graph per role in this form
    assert entry["configuration"]["graph"] == "graph" and entry["parity"]["passed"] is True
    assert entry["parity"]["outputs"].keys() == {"logits" if role == "last" else "hidden_states"}
    built, exported = ModelStage(out), ModelStage(ort_forms[f"ort_{role}"])
    assert built.folder.built and built.graph_form == "ort"
    mask = np.ones((2, 7), dtype=np.int64)
    mask[1, :3] = 0
    x = (
        np.random.default_rng(2).integers(0, 300, size=mask.shape, dtype=np.int64)
        if role == "first"
        else _left_padded(2, 7, 64, seed=2)[0]
    )
    real = mask.astype(bool)
    np.testing.assert_allclose(built.run(x, mask)[real], exported.run(x, mask)[real], rtol=1e-5, atol=1e-5)
    if role == "last":  # prefill + a step on the built graph's shared buffer
        cache_b, cache_e = built.empty_past(2), exported.empty_past(2)
        np.testing.assert_allclose(
            built.step(x, mask, cache_b)[0], exported.step(x, mask, cache_e)[0], rtol=1e-5, atol=1e-5
        )
        step = np.asarray(built.embed_tokens[[1, 2]])[:, None, :]
        longer = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        np.testing.assert_allclose(
            built.step(step, longer, cache_b)[0], exported.step(step, longer, cache_e)[0], rtol=1e-5, atol=1e-5
        )


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_ort_form_quantized_roles(zoo, tmp_path, precision):
    _builder_or_skip()
    from prism_deploy.models.ort_form_builder import export_ort_form

    for role in ("middle", "last"):
        manifest = export_ort_form(zoo["llama"], role, tmp_path / role, precision=precision, max_seq=32)
        assert "MatMulNBits" in _op_types(tmp_path / role / manifest["files"]["graph"]["name"])
        if role == "last":
            _assert_logits_start_selects(tmp_path / role / manifest["files"]["graph"]["name"], manifest["dims"])
        assert manifest["validation"]["hidden_states" if role == "middle" else "logits"]["tokens"] > 0
    # and `build --model` of the quantized form: checked, and running as the export does
    from prism_deploy.cli.main import main

    assert main(["build", "--model", str(tmp_path / "last"), "--target", "ort-cpu", "-o", str(tmp_path / "b")]) == 0
    x = np.random.default_rng(0).normal(0, 0.05, (1, 5, 64)).astype(np.float32)
    mask = np.ones((1, 5), dtype=np.int64)
    np.testing.assert_allclose(
        ModelStage(tmp_path / "b").run(x, mask), ModelStage(tmp_path / "last").run(x, mask), rtol=1e-5, atol=1e-5
    )


# -- bench --model: peers and unstable timings --------------------------------------------------------


def _case(name, median, p10, p90, **info):
    from prism_deploy.bench.models import _instability

    stats = {"median_s": median, "p10_s": p10, "p90_s": p90, "min_s": p10, "samples": 10}
    case = {"name": name, **info, "prefill": dict(stats), "decode": dict(stats)}
    case["unstable"] = _instability(case)
    return case


def test_bench_gives_no_speed_up_against_a_collapsed_baseline():
    from prism_deploy.bench.models import _ratios

    # the run: eager collapsed to ~1 s a token (p90 1.9 s) on a busy machine
    eager = _case("transformers eager", 1.052, 0.05, 1.933, backend="transformers eager", precision="fp32")
    fp32 = _case("b-fp32", 0.0373, 0.036, 0.039, precision="fp32")
    int4 = _case("b-int4", 0.0124, 0.012, 0.013, precision="int4")
    _ratios([eager, fp32, int4])
    assert eager["unstable"] and not fp32["unstable"] and not int4["unstable"]
    for case in (fp32, int4):
        assert "speedup_vs_eager" not in case["decode"]
        assert case["decode"]["unstable_vs_eager"] == ["transformers eager: decode p90/p10 38.66 > 1.5"]
    assert int4["decode"]["speedup_vs_fp32"] == pytest.approx(0.0373 / 0.0124)  # stable pairs keep theirs


def test_bench_peers_say_why_they_are_skipped(monkeypatch):
    import importlib.util

    from prism_deploy.bench import peers

    real = importlib.util.find_spec
    monkeypatch.setattr(
        peers.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("llama_cpp", "onnxruntime_genai") else real(name, *a),
    )
    reasons = peers.peer_reasons()
    assert reasons["llama.cpp"].startswith("llama_cpp is not installed")
    assert "pip install --no-deps onnxruntime-genai" in reasons["onnxruntime-genai"]


@pytest.mark.slow
def test_bench_times_genai_beside_both_forms(ort_forms, zoo, tmp_path):
    """bench --model on the two forms of one last model, with ONNX Runtime GenAI beside them."""
    from prism_deploy.bench.models import run_model_bench

    results = run_model_bench(
        [ort_forms["portable_last"], ort_forms["ort_last"]],
        prompt=4,
        new_tokens=3,
        repeat=2,
        warmup=0,
        eager=False,
        hf_dir=str(zoo["llama"]),
    )
    cases = {c["name"]: c for c in results["cases"]}
    assert set(cases) == {"portable_last", "ort_last", "onnxruntime-genai fp32"}
    assert cases["ort_last"]["graph_form"] == "ort" and cases["onnxruntime-genai fp32"]["decode"]["samples"] == 6
    assert results["peers_skipped"]["llama.cpp"]


def test_chain_runs_on_the_ort_form(ort_forms, zoo, tmp_path):
    """first -> adapter -> last with the ort form's stages generates the portable chain's tokens."""
    from prism_deploy.reference import random_adapter, simple_config
    from prism_deploy.runtime.chain import Chain

    adapter = tmp_path / "a.safetensors"
    random_adapter(simple_config(64, 64, (4, 2), top_k=3), seed=7).save(adapter)
    ids = np.random.default_rng(5).integers(0, 300, size=(2, 6), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    want = Chain([zoo["A"], adapter, ort_forms["portable_last"]]).generate(ids, mask, max_new_tokens=5)
    chain = Chain([ort_forms["ort_first"], adapter, ort_forms["ort_last"]])
    np.testing.assert_array_equal(chain.generate(ids, mask, max_new_tokens=5), want)
    # and the chain's parity check against transformers, the last model's KV path included
    from prism_deploy.parity.chain_parity import ReferenceChain, check_chain_parity

    report = check_chain_parity(chain, ReferenceChain([zoo["llama"], zoo["llama"]], [adapter]), ids, mask, new_tokens=3)
    assert report["passed"], report["failures"]
    assert report["stages"][-1]["graphs"]["graph_with_past"]["passed"]


def test_peer_builds_kept_in_a_peer_dir_are_named_by_their_source(tmp_path):
    """--peer-dir reuses a peer's build only for the same source model: the build's folder name
    carries a digest of the source's resolved path and config."""
    from prism_deploy.bench.peers import source_digest

    a, b = tmp_path / "a", tmp_path / "b"
    for folder, width in ((a, 64), (b, 64)):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"hidden_size": width}))
    assert source_digest(str(a)) == source_digest(str(tmp_path / "x" / ".." / "a"))
    assert source_digest(str(a)) != source_digest(str(b))  # same config, another folder
    before = source_digest(str(a))
    (a / "config.json").write_text(json.dumps({"hidden_size": 128}))
    assert source_digest(str(a)) != before  # the folder's model changed


@pytest.mark.slow
def test_bench_reuses_peer_builds_from_a_peer_dir(ort_forms, zoo, tmp_path):
    """A second run with the same --peer-dir times the GenAI build the first run made."""
    from prism_deploy.bench.models import run_model_bench

    def bench():
        return run_model_bench(
            [ort_forms["ort_last"]],
            prompt=4,
            new_tokens=2,
            repeat=1,
            warmup=0,
            eager=False,
            hf_dir=str(zoo["llama"]),
            peer_dir=tmp_path / "peers",
        )

    bench()
    built = sorted(p.name for p in (tmp_path / "peers").iterdir() if p.name.startswith("genai-"))
    assert len(built) == 1 and built[0].startswith("genai-fp32-")
    graph = next((tmp_path / "peers" / built[0]).glob("*.onnx"))
    stamp = graph.stat().st_mtime_ns
    results = bench()
    assert graph.stat().st_mtime_ns == stamp  # not rebuilt
    assert any(c["name"] == "onnxruntime-genai fp32" for c in results["cases"])
