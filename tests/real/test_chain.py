"""Real models end to end (the `real` set): all-MiniLM-L6-v2 (first, a BERT encoder) -> adapter ->
SmolLM2-135M-Instruct (last, read straight from its GGUF file): export with validation on real
text, collect on the corpus' calibration part, fit, build, run and parity. One export per model,
shared by the module's tests (SmolLM2's alone takes about a minute on the 2-core machine)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prism_deploy.cli.main import main
from prism_deploy.models import real
from tests.conftest import real_model_dir

# one worker for the real set: the models are converted and exported once
pytestmark = [pytest.mark.real, pytest.mark.xdist_group("real-models")]


@pytest.fixture(scope="module")
def folders():
    return {
        "minilm": real_model_dir(real.MINILM),
        "smol": real_model_dir(real.SMOLLM2),
        "smol_gguf": real.source_file(real.SMOLLM2),
    }


@pytest.fixture(scope="module")
def exports(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-exports")
    out = {}
    for key, source, role in (("minilm", folders["minilm"], "first"), ("smol", folders["smol_gguf"], "last")):
        assert (
            main(["export-model", str(source), "--role", role, "-o", str(root / key), "--max-seq", "128", "--json"])
            == 0
        )
        out[key] = root / key
    return out


def manifest(folder):
    return json.loads((folder / "model.json").read_text())


def test_smollm2_from_gguf_validates_on_real_text_and_records_its_file(exports, folders):
    m = manifest(exports["smol"])
    from prism_deploy.core.fsutil import file_sha256

    assert m["source_file"] == {
        "name": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "format": "gguf",
        "bytes": folders["smol_gguf"].stat().st_size,
        "sha256": file_sha256(folders["smol_gguf"]),
    }
    text = m["validation"]["real_text"]
    assert text["language_model"] is True and text["corpus"]["name"] == "pydoc_data.topics (prose)"
    nt = text["next_token"]
    assert nt["tokens"] == 256
    # fp32 export of a real model: the float reference's own predictions, to rounding
    assert nt["agreement"] >= 0.99 and abs(nt["perplexity_ratio"] - 1) < 1e-3
    assert 5 < nt["perplexity_reference"] < 100  # a model that reads this English (random weights: ~49,152)


def test_gguf_export_is_the_graph_of_its_converted_folder(exports, folders):
    """The graph exported from the GGUF file computes what transformers computes from the
    converted Hugging Face folder (the same dequantized weights), on real text."""
    import torch

    from prism_deploy.core import corpus
    from prism_deploy.core.ort_session import make_session
    from prism_deploy.models import hf
    from prism_deploy.models.tokenizers import load_tokenizer

    ids = np.asarray(corpus.token_windows(load_tokenizer(folders["smol"]), corpus.default().text("held_out"), 32, 2))
    mask = np.ones(ids.shape, dtype=np.int64)
    model = hf.load_causal_lm(folders["smol"])
    table = hf.input_embedding_matrix(model)
    with torch.no_grad():
        ref, _ = hf.causal_lm_forward(model, input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    got = make_session(exports["smol"] / "last.onnx", "cpu").run(
        ["logits"], {"inputs_embeds": table[ids], "attention_mask": mask}
    )[0]
    assert np.array_equal(table, np.load(exports["smol"] / "embed_tokens.npy"))
    rel = np.linalg.norm(got - ref.numpy()) / np.linalg.norm(ref.numpy())
    assert rel < 1e-4


def test_minilm_exports_as_first_and_is_not_judged_as_a_language_model(exports):
    m = manifest(exports["minilm"])
    assert m["family"] == "bert" and m["dims"]["hidden"] == 384
    text = m["validation"]["real_text"]
    # its MLM head is not in the checkpoint: no perplexity to gate, its hidden states are checked
    assert text["language_model"] is False
    assert text["output"]["rel_l2"] < 1e-4 and m["validation"]["random_inputs"] == "gated"


def test_minilm_to_smollm2_chain_collect_fit_build_run_parity(exports, folders, tmp_path, capsys):
    from prism_deploy.core import corpus

    texts = tmp_path / "calibration.txt"
    texts.write_text("\n".join(corpus.default().calibration[:48]) + "\n")
    pairs = tmp_path / "pairs.safetensors"
    # model B as its GGUF file: its tokenizer and embedding table are read from it
    assert (
        main(
            [
                "collect",
                "--model-a",
                str(folders["minilm"]),
                "--model-b",
                str(folders["smol_gguf"]),
                "--text",
                str(texts),
                "-o",
                str(pairs),
                "--pool",
                "tokens",
                "--max-seq",
                "64",
                "--json",
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert (info["d_a"], info["d_b"]) == (384, 576) and info["rows"] > 1000
    adapter = tmp_path / "adapter.safetensors"
    assert (
        main(
            [
                "fit",
                "--x",
                f"{pairs}:X",
                "--z",
                f"{pairs}:Z",
                "-o",
                str(adapter),
                "--grid",
                "4",
                "2",
                "--top-k",
                "3",
                "--rounds",
                "1",
                "--gate-steps",
                "30",
                "--ridge",
                "1e-3",
                "--json",
            ]
        )
        == 0
    )
    capsys.readouterr()
    chain = tmp_path / "chain.json"
    chain.write_text(
        json.dumps(
            {
                "tokenizers": {"first": str(folders["minilm"]), "last": str(folders["smol"])},
                "stages": [
                    {"model": str(exports["minilm"]), "hf": str(folders["minilm"]), "name": "minilm"},
                    {"adapter": str(adapter), "name": "adapter"},
                    {"model": str(exports["smol"]), "hf": str(folders["smol"]), "name": "smollm2"},
                ],
            }
        )
    )
    built = tmp_path / "built"
    assert (
        main(
            [
                "build",
                "--chain",
                str(chain),
                "-o",
                str(built),
                "--target",
                "ort-cpu",
                "--batch",
                "1:1:2",
                "--seq",
                "1:16:64",
                "--json",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(["run", "--chain", str(built), "--text", "The capital of France is", "--max-new-tokens", "4", "--json"])
        == 0
    )
    run = json.loads(capsys.readouterr().out)
    assert len(run["generated_ids"][0]) == 4
    assert (
        main(
            [
                "parity",
                "--chain",
                str(built),
                "--text",
                "Every object has an identity, a type and a value.",
                "--new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert "parity: passed" in capsys.readouterr().out
