"""Model A -> adapter -> model B: export, pipeline, generation, parity and collect on tiny local models.

Everything is built here: random 2-layer Llama (hidden 64), Qwen2 (hidden 96) and GPT-2
(hidden 48) models from configs, byte-level BPE tokenizers trained on a few sentences. Nothing
is downloaded. The exports are session-scoped: each graph is exported once per test run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from prism_deploy.cli.main import main
from prism_deploy.core.errors import CheckFailed, PrismInputError
from prism_deploy.format.model_folder import past_names
from prism_deploy.format.model_folder import read_model_json as read_manifest
from prism_deploy.models import hf
from prism_deploy.models.lm_export import export_model
from prism_deploy.models.tokenizers import load_tokenizer
from prism_deploy.reference import load_adapter, random_adapter, simple_config
from tests.model_helpers import SENTENCES


@pytest.fixture(scope="session")
def pipeline(zoo):
    from prism_deploy.runtime.chain import Pipeline

    return Pipeline(zoo["A"], zoo["adapter"], zoo["B"], target="ort-cpu")


def padded_batch(vocab: int, batch: int = 3, seq: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[-1, :3] = 0  # left padding, as batched generation makes
    return ids, mask


# -- export ------------------------------------------------------------------------------------------


def test_first_export_matches_transformers_on_new_inputs(zoo):
    from prism_deploy.core.ort_session import make_session

    manifest = read_manifest(zoo["A"], "first")
    assert manifest["family"] == "llama" and manifest["dims"]["hidden"] == 64 and manifest["max_seq"] == 64
    assert manifest["validation"]["hidden"]["rel_l2"] < 1e-5
    model = onnx.load(str(zoo["A"] / "first.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 9 and [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [19]
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["hidden"]
    # inputs the export's own validation never saw: another shape, another seed
    ids, mask = padded_batch(300, batch=4, seq=13, seed=7)
    got = make_session(zoo["A"] / "first.onnx", "cpu").run(["hidden"], {"input_ids": ids, "attention_mask": mask})[0]
    reference = hf.load_causal_lm(zoo["llama"])
    with torch.no_grad():
        ref = reference.model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=hf.positions_from_mask(torch.from_numpy(mask)),
        ).last_hidden_state.numpy()
    real = mask.astype(bool)
    assert got.shape == (4, 13, 64)
    np.testing.assert_allclose(got[real], ref[real], rtol=1e-4, atol=1e-4)
    # the hidden state is taken after the final norm: the LM head applied to it gives the logits
    with torch.no_grad():
        logits = reference(
            input_ids=torch.from_numpy(ids[:1]), attention_mask=torch.from_numpy(mask[:1])
        ).logits.numpy()
    np.testing.assert_allclose(got[:1] @ reference.lm_head.weight.detach().numpy().T, logits, rtol=1e-4, atol=1e-4)


def test_last_export_graphs_names_and_embedding_table(zoo):
    manifest = read_manifest(zoo["B"], "last")
    assert manifest["dims"] == {"hidden": 96, "vocab": 320, "layers": 2, "kv_heads": 2, "head_dim": 24}
    assert manifest["validation"]["logits"]["top1"] == 1.0
    assert manifest["validation"]["logits_with_past"]["rel_l2"] < 1e-5
    plain = onnx.load(str(zoo["B"] / "last.onnx"))
    assert [i.name for i in plain.graph.input] == ["inputs_embeds", "attention_mask"]
    assert [o.name for o in plain.graph.output] == ["logits"]
    with_past = onnx.load(str(zoo["B"] / "last_with_past.onnx"))
    onnx.checker.check_model(with_past, full_check=True)
    # logits_start: an initializer listed as an input too (fed only to compute fewer positions' logits)
    assert [i.name for i in with_past.graph.input] == [
        "inputs_embeds",
        "attention_mask",
        *past_names(2),
        "logits_start",
    ]
    assert "logits_start" in {t.name for t in with_past.graph.initializer}
    assert [o.name for o in with_past.graph.output] == ["logits", *past_names(2, "present")]
    table = np.load(zoo["B"] / "embed_tokens.npy")
    expected = hf.load_causal_lm(zoo["qwen2"]).get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(table, expected)
    for key, entry in manifest["files"].items():
        assert (zoo["B"] / entry["name"]).is_file(), key


def test_gpt2_exports_both_roles(zoo, tmp_path):
    up = export_model(zoo["gpt2"], "first", tmp_path / "up", max_seq=32)
    low = export_model(zoo["gpt2"], "last", tmp_path / "low", max_seq=32)
    assert up["family"] == low["family"] == "gpt2"
    assert up["validation"]["hidden"]["rel_l2"] < 1e-5
    assert low["validation"]["logits_with_past"]["top1"] == 1.0


def test_mistral_with_sliding_window_exports(tmp_path):
    """A window (4) shorter than the validation sequences: the traced masks must keep applying it."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(4)
    MistralForCausalLM(
        MistralConfig(
            vocab_size=200,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            sliding_window=4,
        )
    ).save_pretrained(str(tmp_path / "mistral"))
    up = export_model(tmp_path / "mistral", "first", tmp_path / "up", max_seq=32)
    low = export_model(tmp_path / "mistral", "last", tmp_path / "low", max_seq=32)
    assert up["family"] == "mistral" and up["validation"]["hidden"]["rel_l2"] < 1e-5
    assert low["validation"]["logits_with_past"]["top1"] == 1.0 and low["validation"]["logits"]["tokens"] > 4


def test_export_fails_when_the_graph_diverges(zoo, tmp_path, monkeypatch):
    """Perturb the exported weights after tracing: the validation must catch it, and no manifest is left."""
    from prism_deploy.core.onnx_io import save_model
    from prism_deploy.models import lm_export as export_mod

    original = export_mod._export_graph

    def export_then_perturb(*args, **kwargs):
        written = original(*args, **kwargs)
        path = args[2]
        model = onnx.load(str(path))
        biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        arr = onnx.numpy_helper.to_array(biggest) * 1.05
        biggest.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), biggest.name))
        save_model(model, path)
        return written

    monkeypatch.setattr(export_mod, "_export_graph", export_then_perturb)
    with pytest.raises(CheckFailed, match="diverges"):
        export_model(zoo["llama"], "first", tmp_path / "bad", max_seq=32)
    assert not (tmp_path / "bad" / "model.json").exists()


def test_export_with_external_weights(zoo, tmp_path, monkeypatch):
    """Graphs over the 2 GiB protobuf limit keep their weights in ``<graph>.data``: forced here with a 0 threshold."""
    from prism_deploy.core import onnx_io
    from prism_deploy.runtime.chain import Pipeline

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 0)
    m = export_model(zoo["qwen2"], "last", tmp_path / "B", max_seq=32)
    assert m["files"]["last_data"]["name"] == "last.onnx.data"
    assert m["files"]["last_with_past_data"]["name"] == "last_with_past.onnx.data"
    assert sorted(p.name for p in (tmp_path / "B").iterdir()) == sorted(  # and nothing else (no lock file)
        [
            "embed_tokens.npy",
            "last.onnx",
            "last.onnx.data",
            "last_with_past.onnx",
            "last_with_past.onnx.data",
            "model.json",
        ]
    )
    # the weights really are outside (only tensors under 1 KiB, norms and biases, stay inline)
    assert (tmp_path / "B" / "last.onnx").stat().st_size * 4 < (tmp_path / "B" / "last.onnx.data").stat().st_size
    pipe = Pipeline(zoo["A"], zoo["adapter"], tmp_path / "B")
    ids, mask = padded_batch(300, batch=2, seq=5)
    assert pipe.generate(ids, mask, max_new_tokens=3).shape == (2, 3)


def test_export_fp16_lower_validates(zoo, tmp_path):
    m = export_model(zoo["llama"], "last", tmp_path / "fp16", precision="fp16", max_seq=32)
    v = m["validation"]
    assert 0 < v["logits"]["rel_l2"] < 2e-2 and v["logits"]["top1"] >= 0.95
    assert np.load(tmp_path / "fp16" / "embed_tokens.npy").dtype == np.float16


def test_export_model_cli_and_bad_inputs(zoo, tmp_path, capsys):
    assert (
        main(
            [
                "export-model",
                str(zoo["gpt2"]),
                "--role",
                "first",
                "-o",
                str(tmp_path / "g"),
                "--max-seq",
                "16",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["role"] == "first"
    for argv, needle in (
        (["export-model", str(tmp_path / "missing"), "--role", "first", "-o", str(tmp_path / "x")], "not a folder"),
        (["export-model", str(tmp_path), "--role", "first", "-o", str(tmp_path / "x")], "no config.json"),
        (
            ["export-model", str(zoo["gpt2"]), "--role", "first", "-o", str(tmp_path / "x"), "--max-seq", "4096"],
            "--max-seq",
        ),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1
    with pytest.raises(PrismInputError, match="role"):
        read_manifest(zoo["A"], "last")


# -- pipeline ----------------------------------------------------------------------------------------


def test_pipeline_logits_match_the_pytorch_chain(zoo, pipeline):
    from prism_deploy.parity.chain_parity import check_pipeline_parity

    ids, mask = padded_batch(300)
    logits = pipeline(ids, mask)
    assert logits.shape == (3, 9, 320) and logits.dtype == np.float32
    assert set(pipeline.timings) == {"model_a", "adapter", "model_b"}
    report = check_pipeline_parity(zoo["llama"], zoo["adapter"], zoo["qwen2"], pipeline, ids, mask)
    assert report["passed"], report["failures"]
    assert report["tokens"] == int(mask.sum())
    assert report["logits"]["rel_l2"] < 1e-5 and report["logits"]["kl_max"] < 1e-8 and report["logits"]["top1"] == 1.0


def test_parity_catches_a_different_adapter(zoo, pipeline, tmp_path):
    from prism_deploy.parity.chain_parity import check_pipeline_parity

    other = tmp_path / "other.safetensors"
    random_adapter(simple_config(64, 96, (4, 2), top_k=3), seed=6).save(other)
    ids, mask = padded_batch(300, batch=2, seq=6)
    report = check_pipeline_parity(zoo["llama"], other, zoo["qwen2"], pipeline, ids, mask)
    assert not report["passed"]
    assert any(f.startswith("stage 2 (adapter") for f in report["failures"])  # charged to the adapter hop
    assert report["bisect"]["found"] == 2 and report["bisect"]["kind"] == "adapter"
    assert report["hidden"]["rel_l2"] < 1e-5  # model A itself still agrees


def test_greedy_generation_equals_transformers(zoo, pipeline):
    ids, mask = padded_batch(300, batch=3, seq=8, seed=3)
    got = pipeline.generate(ids, mask, max_new_tokens=7)
    assert got.shape == (3, 7)
    assert pipeline.timings["steps"] == 7
    adapter = load_adapter(zoo["adapter"])
    model_a, model_b = hf.load_causal_lm(zoo["llama"]), hf.load_causal_lm(zoo["qwen2"])
    with torch.no_grad():
        prefix = adapter(hf.final_hidden(model_a, torch.from_numpy(ids), torch.from_numpy(mask)))
        want = model_b.generate(
            inputs_embeds=prefix,
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=7,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    np.testing.assert_array_equal(got, want.numpy())


def test_generation_stops_at_eos(pipeline):
    ids, mask = padded_batch(300, batch=2, seq=5, seed=4)
    free = pipeline.generate(ids, mask, max_new_tokens=4)
    eos = int(free[0, 1])  # pretend row 0's second token is the end of text
    stopped = pipeline.generate(ids, mask, max_new_tokens=4, eos_token_id=eos)
    assert stopped[0, 1] == eos and (stopped[0, 1:] == eos).all()
    first_eos = np.argmax(free[1] == eos) if (free[1] == eos).any() else 4
    np.testing.assert_array_equal(stopped[1, :first_eos], free[1, :first_eos])


def test_pipeline_refuses_bad_inputs(zoo, pipeline):
    from prism_deploy.runtime.chain import Pipeline

    with pytest.raises(PrismInputError, match="vocabulary"):
        pipeline(np.array([[1, 2, 300]]))
    with pytest.raises(PrismInputError, match="attention_mask"):
        pipeline(np.array([[1, 2, 3]]), np.array([[1, 1]]))
    with pytest.raises(PrismInputError, match="max_seq"):
        pipeline(np.ones((1, 65), dtype=np.int64))
    with pytest.raises(PrismInputError, match="role"):
        Pipeline(zoo["B"], zoo["adapter"], zoo["A"])
    wrong = zoo["adapter"].with_name("wrong-width.safetensors")
    random_adapter(simple_config(64, 90, (2, 2)), seed=1).save(wrong)
    with pytest.raises(PrismInputError, match="out_dim 90 does not match the embedding width 96"):
        Pipeline(zoo["A"], wrong, zoo["B"])


def write_dense_adapter_onnx(adapter, path) -> None:
    """An ungated adapter's dense matrix as one MatMul graph (input ``hidden``, output ``adapted``)."""
    from onnx import TensorProto, helper, numpy_helper

    from prism_deploy.core.onnx_io import finalize, save_model

    d_in, d_out = adapter.config.in_dim, adapter.config.out_dim
    weight = adapter.dense_matrix(torch.float32).numpy().T.copy()  # [in, out]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["hidden", "W"], ["adapted"])],
        "dense_adapter",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", d_in])],
        [helper.make_tensor_value_info("adapted", TensorProto.FLOAT, ["batch", "seq", d_out])],
        [numpy_helper.from_array(weight, "W")],
    )
    save_model(finalize(helper.make_model(graph)), path)


def test_adapter_onnx_file_runs_in_the_pipeline(zoo, pipeline, tmp_path):
    """An adapter given as ONNX (input ``hidden``, output ``adapted``) plugs in the same way."""
    from prism_deploy.runtime.adapters import adapter_runner
    from prism_deploy.runtime.chain import Pipeline

    adapter = random_adapter(simple_config(64, 96, (2, 2)), seed=3)
    path = tmp_path / "adapter.onnx"
    write_dense_adapter_onnx(adapter, path)
    ids, mask = padded_batch(300, batch=2, seq=5)
    hidden = pipeline.first.run(ids, mask)
    with torch.no_grad():
        want = adapter(torch.from_numpy(hidden)).numpy()
    np.testing.assert_allclose(adapter_runner(path, "ort-cpu").run(hidden), want, rtol=1e-4, atol=1e-5)
    onnx_pipe = Pipeline(zoo["A"], path, zoo["B"])
    assert onnx_pipe.describe()["adapter_runner"] == "onnx"
    np.testing.assert_allclose(onnx_pipe(ids, mask), pipeline.last.run(want, mask), rtol=1e-4, atol=1e-4)
    onnx_pipe.generate(ids, mask, max_new_tokens=2)
    # an ONNX adapter takes model A's output where it lies; a numpy-only runner cannot
    assert onnx_pipe.describe()["adapter_on_device"] and onnx_pipe.host_round_trips == 0
    from prism_deploy.reference import ReferenceAdapterRunner

    host_pipe = Pipeline(zoo["A"], ReferenceAdapterRunner(zoo["adapter"]), zoo["B"])
    host_pipe(ids, mask)
    assert not host_pipe.describe()["adapter_on_device"] and host_pipe.host_round_trips == 1


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_safetensors_adapter_is_lowered_once_and_cached(tmp_path, monkeypatch, precision):
    """A .safetensors is lowered with prism_deploy.last.export_onnx on first use, then reused."""
    import prism_deploy.lower as lower
    from prism_deploy.runtime.adapter_session import AdapterGraph
    from prism_deploy.runtime.adapters import adapter_runner

    calls = []
    real = lower.export_onnx

    def spy(adapter, path, **kwargs):
        calls.append((Path(path).name, kwargs.get("precision")))
        return real(adapter, path, **kwargs)

    monkeypatch.setattr(lower, "export_onnx", spy)
    path = tmp_path / "gated.safetensors"
    adapter = random_adapter(simple_config(40, 24, (2, 4), top_k=3), seed=8)
    adapter.save(path)
    first = adapter_runner(path, "ort-cpu", precision=precision)
    second = adapter_runner(path, "ort-cpu", precision=precision)
    assert calls == [(first.path.name, precision)] and first.path.name.startswith("gated-")
    assert isinstance(second, AdapterGraph) and second.path == first.path
    assert second.path.parent == tmp_path / ".prism-cache" and second.precision == precision
    x = np.random.default_rng(0).normal(size=(2, 3, 40)).astype(np.float32)
    with torch.no_grad():
        want = adapter(torch.from_numpy(x)).numpy()
    got = second.run(x)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < (1e-5 if precision == "fp32" else 2e-2)


def test_build_folder_runs_in_the_pipeline(zoo, pipeline, tmp_path, capsys):
    """`prism-deploy build` output as the adapter: load_engines runs it, parity still holds."""
    from prism_deploy.runtime.adapters import adapter_runner
    from prism_deploy.runtime.chain import Pipeline

    with pytest.raises(PrismInputError, match="manifest.json"):
        adapter_runner(tmp_path, "ort-cpu")
    engines = tmp_path / "engines"
    assert main(["build", str(zoo["adapter"]), "-o", str(engines), "--target", "ort-cpu"]) == 0
    capsys.readouterr()
    built = Pipeline(zoo["A"], engines, zoo["B"])
    assert built.describe()["adapter_runner"] != "onnx"  # the build layer's own runner
    ids, mask = padded_batch(300, batch=2, seq=7, seed=2)
    np.testing.assert_allclose(built(ids, mask), pipeline(ids, mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        built.generate(ids, mask, max_new_tokens=4), pipeline.generate(ids, mask, max_new_tokens=4)
    )
    # the documented spelling: `parity --pipeline` routes to the end-to-end check
    assert (
        main(
            [
                "parity",
                "--pipeline",
                "--model-a-hf",
                str(zoo["llama"]),
                "--model-a",
                str(zoo["A"]),
                "--model-b-hf",
                str(zoo["qwen2"]),
                "--model-b",
                str(zoo["B"]),
                "--adapter",
                str(engines),
                "--adapter-file",
                str(zoo["adapter"]),
                "--batch",
                "2",
                "--seq",
                "6",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["passed"]


@pytest.mark.gpu
def test_pipeline_on_ort_cuda_matches_cpu(zoo, pipeline):
    from prism_deploy.core.targets import cuda_provider_available
    from prism_deploy.runtime.chain import Pipeline

    ok, why = cuda_provider_available()
    if not ok:
        pytest.skip(f"ORT CUDA: {why}")
    gpu = Pipeline(zoo["A"], zoo["adapter"], zoo["B"], target="ort-cuda")
    ids, mask = padded_batch(300)
    np.testing.assert_allclose(gpu(ids, mask), pipeline(ids, mask), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(
        gpu.generate(ids, mask, max_new_tokens=5), pipeline.generate(ids, mask, max_new_tokens=5)
    )


# -- CLI: run and parity-pipeline ----------------------------------------------------------------------


def test_run_cli_text_to_generated_tokens(zoo, capsys):
    argv = [
        "run",
        "--model-a",
        str(zoo["A"]),
        "--adapter",
        str(zoo["adapter"]),
        "--model-b",
        str(zoo["B"]),
        "--text",
        "The quick brown fox",
        "--tokenizer-a",
        str(zoo["llama"]),
        "--tokenizer-b",
        str(zoo["qwen2"]),
        "--max-new-tokens",
        "4",
        "--ignore-eos",
        "--json",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["generated_ids"][0]) == 4 and isinstance(out["generated_text"][0], str)
    assert set(out["timings_s"]["forward"]) == {"model_a", "adapter", "model_b"}
    assert out["adapter_runner"] == "onnx" and out["adapter_on_device"]  # lowered on first use
    assert main(argv[:-1]) == 0  # the table form
    assert "model_b_decode (4 steps)" in capsys.readouterr().out
    # without --ignore-eos the row stops at model B's end-of-text id (0, from its config)
    assert read_manifest(zoo["B"])["eos_token_id"] == 0
    assert main([a for a in argv if a != "--ignore-eos"]) == 0
    stopped = json.loads(capsys.readouterr().out)
    free = out["generated_ids"][0]
    expected = free[: free.index(0) + 1] if 0 in free else free
    assert stopped["eos_token_id"] == 0 and stopped["generated_ids"][0] == expected


def test_run_cli_ids_file_and_errors(zoo, tmp_path, capsys):
    ids_file = tmp_path / "ids.json"
    ids_file.write_text("[[1, 2, 3], [4, 5, 6]]")
    base = ["run", "--model-a", str(zoo["A"]), "--adapter", str(zoo["adapter"]), "--model-b", str(zoo["B"])]
    assert main([*base, "--ids", str(ids_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["logits_shape"] == [2, 3, 320]
    ragged = tmp_path / "ragged.json"
    ragged.write_text("[[1, 2], [3]]")
    for extra, needle in (
        (["--ids", str(ragged)], "same length"),
        (["--text", "hi"], "--tokenizer-a"),
        (["--ids", str(tmp_path / "none.npy")], "no such file"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1


def test_parity_pipeline_cli_passes_and_fails(zoo, tmp_path, capsys):
    base = [
        "parity-pipeline",
        "--model-a-hf",
        str(zoo["llama"]),
        "--model-a",
        str(zoo["A"]),
        "--model-b-hf",
        str(zoo["qwen2"]),
        "--model-b",
        str(zoo["B"]),
        "--adapter",
        str(zoo["adapter"]),
        "--batch",
        "2",
        "--seq",
        "6",
    ]
    assert main([*base, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["logits"]["kl_max"] < 1e-8
    other = tmp_path / "other.safetensors"
    random_adapter(simple_config(64, 96, (4, 2), top_k=3), seed=9).save(other)
    assert main([*base, "--adapter-file", str(other)]) == 1
    err = capsys.readouterr().err
    assert "check failed" in err and "stage 2 (adapter adapter)" in err and "bisect: stage 2" in err


# -- collect -------------------------------------------------------------------------------------------


def test_align_by_offsets_rule():
    from prism_deploy.models.collect import align_by_offsets

    # text "ab cd": A tokens "ab", " cd"; B tokens "a", "b", " c", "d"; A's special token (0, 0) is skipped
    a = [None, (0, 2), (2, 5)]
    b = [(0, 1), (1, 2), (2, 4), (4, 5)]
    assert align_by_offsets(a, b) == [(1, 1), (2, 3)]
    # a character B does not cover (index 2) goes to the last B token starting before it
    assert align_by_offsets([(0, 3)], [(0, 2), (3, 5)]) == [(0, 0)]
    assert align_by_offsets([(0, 2)], [None]) == []
    # "a b": a whitespace token trimmed to (2, 2) stands for the space at 1, on either side
    assert align_by_offsets([(0, 1), (2, 2), (2, 3)], [(0, 1), (1, 3)]) == [(0, 0), (1, 1), (2, 1)]
    assert align_by_offsets([(0, 1), (1, 3)], [(0, 1), (2, 2), (2, 3)]) == [(0, 0), (1, 2)]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_embedding_table_is_read_without_loading_the_model(zoo, kind, monkeypatch):
    full = hf.input_embedding_matrix(hf.load_causal_lm(zoo[kind]))

    def refuse(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(hf, "load_causal_lm", refuse)
    np.testing.assert_array_equal(hf.load_input_embedding_matrix(zoo[kind]), full)


def test_collect_pools_against_transformers(zoo, tmp_path):
    from prism_deploy.core.data import MatrixFile

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES[:4]) + "\n\n")
    tok_a, tok_b = load_tokenizer(zoo["llama"]), load_tokenizer(zoo["qwen2"])
    model_a = hf.load_causal_lm(zoo["llama"])
    table_b = hf.load_causal_lm(zoo["qwen2"]).get_input_embeddings().weight.detach().numpy()
    for pool in ("last", "mean", "tokens"):
        out = tmp_path / f"pairs-{pool}.safetensors"
        assert (
            main(
                [
                    "collect",
                    "--model-a",
                    str(zoo["llama"]),
                    "--model-b",
                    str(zoo["qwen2"]),
                    "--text",
                    str(texts),
                    "-o",
                    str(out),
                    "--pool",
                    pool,
                    "--batch",
                    "3",
                ]
            )
            == 0
        )
        x, z = MatrixFile(out, "X").read(), MatrixFile(out, "Z").read()
        assert x.shape[1] == 64 and z.shape[1] == 96 and x.shape[0] == z.shape[0]
        # recompute the third text (the second batch) independently, one text at a time
        text = SENTENCES[2]
        ea = tok_a(text, return_offsets_mapping=True)
        eb = tok_b(text, add_special_tokens=False, return_offsets_mapping=True)
        with torch.no_grad():
            h = model_a.model(input_ids=torch.tensor([ea["input_ids"]])).last_hidden_state[0].numpy()
        emb = table_b[eb["input_ids"]]
        if pool == "last":
            assert x.shape[0] == 4
            np.testing.assert_allclose(x[2], h[-1], rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(z[2], emb[-1])
        elif pool == "mean":
            np.testing.assert_allclose(x[2], h.mean(0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(z[2], emb.mean(0), rtol=1e-6, atol=1e-7)
        else:
            counts = [len(tok_a(t)["input_ids"]) for t in SENTENCES[:4]]
            assert x.shape[0] == sum(counts)
            start = sum(counts[:2])

            def chars(s, e):  # a trimmed whitespace token (s, s) stands for the character s-1
                return (s, e) if e > s else (s - 1, s)

            for i, span in enumerate(ea["offset_mapping"]):
                # brute force: the B token whose characters contain the A token's last character
                last = chars(*span)[1] - 1
                j = next(j for j, o in enumerate(eb["offset_mapping"]) if chars(*o)[0] <= last < chars(*o)[1])
                np.testing.assert_allclose(x[start + i], h[i], rtol=1e-4, atol=1e-5)
                np.testing.assert_array_equal(z[start + i], emb[j])


def test_collect_bad_inputs(zoo, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    base = ["collect", "--model-a", str(zoo["llama"]), "--model-b", str(zoo["qwen2"])]
    for extra, needle in (
        (["--text", str(empty), "-o", str(tmp_path / "p.safetensors")], "no non-empty lines"),
        (["--text", str(empty), "-o", str(tmp_path / "p.npy")], ".safetensors"),
    ):
        assert main([*base, *extra]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "p.safetensors").exists()


# -- other precisions and families ---------------------------------------------------------------


def test_fp16_pipeline_parity_and_generation(zoo, tmp_path):
    """fp16 exports of both models: parity within the fp16 set, generation close to float32's."""
    from prism_deploy.parity.chain_parity import check_pipeline_parity
    from prism_deploy.runtime.chain import Pipeline

    export_model(zoo["llama"], "first", tmp_path / "A16", precision="fp16", max_seq=64)
    export_model(zoo["qwen2"], "last", tmp_path / "B16", precision="fp16", max_seq=64)
    pipe = Pipeline(tmp_path / "A16", zoo["adapter"], tmp_path / "B16")
    ids, mask = padded_batch(300, batch=4, seq=16, seed=11)
    report = check_pipeline_parity(zoo["llama"], zoo["adapter"], zoo["qwen2"], pipe, ids, mask)
    assert report["precision"] == "fp16"
    assert report["passed"], report["failures"]
    assert report["logits"]["rel_l2"] > 1e-6  # really ran in half precision


def test_gpt2_as_model_b_generates_like_transformers(zoo, tmp_path):
    from prism_deploy.runtime.chain import Pipeline

    export_model(zoo["gpt2"], "last", tmp_path / "Bg", max_seq=64)
    path = tmp_path / "to_gpt2.safetensors"
    random_adapter(simple_config(64, 48, (2, 4), top_k=2), seed=2).save(path)
    pipe = Pipeline(zoo["A"], path, tmp_path / "Bg")
    ids, mask = padded_batch(300, batch=2, seq=7, seed=5)
    got = pipe.generate(ids, mask, max_new_tokens=6)
    model_a, model_b = hf.load_causal_lm(zoo["llama"]), hf.load_causal_lm(zoo["gpt2"])
    with torch.no_grad():
        prefix = load_adapter(path)(hf.final_hidden(model_a, torch.from_numpy(ids), torch.from_numpy(mask)))
        want = model_b.generate(
            inputs_embeds=prefix,
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    np.testing.assert_array_equal(got, want.numpy())


def test_chain_collect_fit_run_parity(zoo, tmp_path, capsys):
    """Two model folders and a text file to generated tokens: collect -> fit -> run -> parity."""
    import random

    from safetensors.numpy import load_file

    rnd = random.Random(0)
    words = " ".join(SENTENCES).split()
    (tmp_path / "corpus.txt").write_text(
        "\n".join(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 12))) for _ in range(40)) + "\n"
    )
    pairs = tmp_path / "pairs.safetensors"
    assert (
        main(
            [
                "collect",
                "--model-a",
                str(zoo["llama"]),
                "--model-b",
                str(zoo["qwen2"]),
                "--text",
                str(tmp_path / "corpus.txt"),
                "-o",
                str(pairs),
                "--pool",
                "tokens",
                "--batch",
                "16",
            ]
        )
        == 0
    )
    data = load_file(str(pairs))
    # `fit` reads one array per file today: hand it X and Z as .npy (see the report on names)
    np.save(tmp_path / "X.npy", data["X"])
    np.save(tmp_path / "Z.npy", data["Z"])
    fitted = tmp_path / "fitted.safetensors"
    assert (
        main(
            [
                "fit",
                "--x",
                str(tmp_path / "X.npy"),
                "--z",
                str(tmp_path / "Z.npy"),
                "-o",
                str(fitted),
                "--grid",
                "4",
                "2",
                "--top-k",
                "3",
                "--rounds",
                "1",
                "--gate-steps",
                "50",
            ]
        )
        == 0
    )
    capsys.readouterr()
    base = ["--model-a", str(zoo["A"]), "--adapter", str(fitted), "--model-b", str(zoo["B"])]
    assert (
        main(
            [
                "run",
                *base,
                "--text",
                "the lazy dog",
                "--tokenizer-a",
                str(zoo["llama"]),
                "--tokenizer-b",
                str(zoo["qwen2"]),
                "--max-new-tokens",
                "5",
                "--json",
            ]
        )
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["generated_ids"][0]) == 5
    assert (
        main(
            [
                "parity-pipeline",
                *base,
                "--model-a-hf",
                str(zoo["llama"]),
                "--model-b-hf",
                str(zoo["qwen2"]),
                "--text",
                "Tiles of weights are routed",
                "--tokenizer-a",
                str(zoo["llama"]),
            ]
        )
        == 0
    )
    assert "parity: passed" in capsys.readouterr().out


def test_loading_a_sentence_encoder_as_a_first_model_says_nothing(tmp_path, capfd):
    """A BERT encoder read as a first model made transformers warn that BertLMHeadModel wants
    is_decoder=True (its head is never used): the library's notes are silenced around the
    loads, and its verbosity is as it was afterwards."""
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    ).save_pretrained(str(tmp_path))
    verbosity = hf_logging.get_verbosity()
    capfd.readouterr()
    model = hf.load_causal_lm(tmp_path, uses_head=False)
    assert type(model).__name__ == "BertLMHeadModel" and not model.config.is_decoder
    assert capfd.readouterr().err == ""
    assert hf_logging.get_verbosity() == verbosity


def test_the_gguf_loaders_own_bar_is_off_only_while_loading(capfd):
    """transformers draws its GGUF tensor bar with plain tqdm, which its progress switch does not
    reach: the loader's bar is turned off for the load, and back as it was after."""
    pytest.importorskip("gguf")
    import transformers.modeling_gguf_pytorch_utils as gguf_loader

    bar = gguf_loader.tqdm
    capfd.readouterr()
    with hf.quiet_loading(gguf_file=True):
        assert sum(gguf_loader.tqdm(range(5), desc="Converting and de-quantizing GGUF tensors...")) == 10
    assert capfd.readouterr().err == ""
    assert gguf_loader.tqdm is bar
    with pytest.raises(ValueError), hf.quiet_loading(gguf_file=True):
        raise ValueError("a real error passes through")
    assert gguf_loader.tqdm is bar


def test_a_long_text_tokenized_whole_says_nothing(tmp_path, capfd):
    """Export tokenizes its calibration text whole and cuts it into windows: transformers'
    "sequence length is longer than the specified maximum" warning was noise on stderr."""
    from tests.model_helpers import make_tokenizer

    make_tokenizer(tmp_path, 300)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 8}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.model_max_length == 8
    capfd.readouterr()
    assert len(tokenizer(" ".join(SENTENCES))["input_ids"]) > 8
    assert capfd.readouterr().err == ""
