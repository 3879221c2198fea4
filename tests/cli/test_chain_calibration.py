"""export-model --calibration-chain CHAIN --hop N: a middle or last model's GPTQ / --mixed
calibration reads what the model reads in its chain, the text through the upstream model and the
hop's adapter, not the rows of its own embedding table; model.json records that source."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
import transformers

from prism_deploy.cli.main import main
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.fsutil import file_sha256
from prism_deploy.models import quantize
from prism_deploy.models.lm_export import embedding_feeds
from prism_deploy.models.tokenizers import load_tokenizer
from prism_deploy.reference import load_adapter

TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog, then rests by the river bank." for i in range(12)
)


@pytest.fixture
def chain(zoo, tmp_path):
    (tmp_path / "calib.txt").write_text(TEXT, encoding="utf-8")
    path = tmp_path / "chain.json"
    path.write_text(
        json.dumps(
            {
                "stages": [
                    {"model": str(zoo["A"]), "hf": str(zoo["llama"]), "name": "llama"},
                    {"adapter": str(zoo["adapter"]), "name": "a"},
                    {"model": str(zoo["B"]), "hf": str(zoo["qwen2"]), "name": "qwen2"},
                ]
            }
        )
    )
    return path


def _export(zoo, tmp_path, chain, *extra):
    return main(
        [
            "export-model",
            str(zoo["qwen2"]),
            "--role",
            "last",
            "-o",
            str(tmp_path / "out"),
            "--max-seq",
            "32",
            "--precision",
            "int4",
            "--mixed",
            "--calibration-text",
            str(tmp_path / "calib.txt"),
            "--calibration-chain",
            str(chain),
            *extra,
            "--json",
        ]
    )


def test_feeds_are_the_adapter_outputs_on_the_chain_text(zoo, tmp_path, chain, monkeypatch, capsys):
    seen = []
    real_layer_inputs = quantize.layer_inputs

    def recording(graph, feeds):
        seen.extend(feeds)
        return real_layer_inputs(graph, feeds)

    monkeypatch.setattr(quantize, "layer_inputs", recording)
    assert _export(zoo, tmp_path, chain, "--hop", "1") == 0
    manifest = json.loads(capsys.readouterr().out)

    # what the chain feeds the last model on the first paragraph: llama's final hidden states, through the adapter
    paragraph = TEXT.split("\n\n")[0]
    ids = load_tokenizer(zoo["llama"])(paragraph, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        upstream = transformers.AutoModel.from_pretrained(zoo["llama"])(input_ids=ids).last_hidden_state[0]
        expected = load_adapter(zoo["adapter"])(upstream).numpy()
    first = seen[0]["inputs_embeds"][0]
    assert first.shape == expected.shape
    np.testing.assert_allclose(first, expected, rtol=1e-4, atol=1e-5)
    # not the rows of qwen2's own embedding table for its tokens of that text
    own_ids = load_tokenizer(zoo["qwen2"])(paragraph)["input_ids"]
    table = (
        transformers.AutoModelForCausalLM.from_pretrained(zoo["qwen2"]).get_input_embeddings().weight.detach().numpy()
    )
    rows = table[own_ids[: len(first)]]
    assert np.abs(first[: len(rows)] - rows).max() > 1e-2

    calibration = manifest["quantization"]["calibration"]
    assert calibration["source"] == "chain" and calibration["hop"] == 1 and calibration["chain"] == str(chain)
    assert calibration["adapter_sha256"] == file_sha256(zoo["adapter"])
    assert calibration["upstream_model"] == str(zoo["llama"]) and calibration["text"] == "--calibration-text"
    assert calibration["tokens"] == sum(f["inputs_embeds"].shape[1] for f in seen) > 16
    from prism_deploy.format.model_folder import read_model_json

    assert read_model_json(tmp_path / "out", "last")["quantization"]["calibration"] == calibration


@pytest.mark.parametrize(
    "change,expected",
    [
        (("--hop", "1", "--calibration-chain", "missing.toml"), "missing.toml: no such chain file"),
        (("--hop", "2"), "--hop: 2 must be in 1..1"),
        (("--hop", "1", "--role", "first"), "--calibration-chain: a first model reads token ids"),
    ],
)
def test_bad_chain_calibration_is_one_error_line(zoo, tmp_path, chain, capsys, change, expected):
    assert _export(zoo, tmp_path, chain, *change) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "out").exists()


def test_wrong_model_for_the_hop_is_refused(zoo, tmp_path, chain, capsys):
    assert (
        main(
            [
                "export-model",
                str(zoo["llama"]),
                "--role",
                "last",
                "-o",
                str(tmp_path / "out"),
                "--precision",
                "int4",
                "--mixed",
                "--calibration-chain",
                str(chain),
                "--hop",
                "1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be the one the hop's adapter feeds" in err[0]


def test_inputs_of_the_wrong_width_are_refused():
    with pytest.raises(PrismInputError, match=r"chain.json: .*\[40, 64\].*\[tokens, 96\]"):
        embedding_feeds([np.zeros((40, 64), np.float32)], {"source": "chain", "chain": "chain.json"}, 96)
    feeds, record = embedding_feeds(
        [np.ones((300, 96), np.float32), np.ones((300, 96), np.float32)], {"source": "x"}, 96
    )
    assert [f["inputs_embeds"].shape[1] for f in feeds] == [256, 44, 212] and record["tokens"] == 512


def test_adapter_int8_calibration_reads_a_collect_pairs_file_as_its_hidden_states(zoo, tmp_path):
    """The adapter's existing hook, build/export --calib FILE: a `collect --chain --hop N` pairs file
    calibrates on its X (the upstream model's hidden states on the chain's text)."""
    from prism_deploy.lower import export_onnx
    from prism_deploy.models.collect import save_pairs

    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, size=(200, 64)).astype(np.float32)
    pairs = tmp_path / "pairs.safetensors"
    save_pairs(pairs, x, rng.normal(size=(200, 96)).astype(np.float32), {"pool": "tokens"})
    adapter = load_adapter(zoo["adapter"])

    def scales(calib, name):
        export_onnx(adapter, tmp_path / name, precision="int8-qdq", calib=calib)
        model = onnx.load(str(tmp_path / name))
        return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if "scale" in i.name}

    from_file, from_x, from_other = scales(pairs, "f.onnx"), scales(x, "x.onnx"), scales(2 * x, "o.onnx")
    assert from_file and all(np.array_equal(from_file[k], from_x[k]) for k in from_x)
    assert any(not np.array_equal(from_file[k], from_other[k]) for k in from_x)


def test_the_summary_names_the_chain(zoo, tmp_path, chain, capsys):
    assert (
        main(
            [
                "export-model",
                str(zoo["qwen2"]),
                "--role",
                "last",
                "-o",
                str(tmp_path / "out"),
                "--max-seq",
                "32",
                "--precision",
                "int8",
                "--mixed",
                "--calibration-chain",
                str(chain),
                "--hop",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"through hop 1 of {chain}" in out and "(calibration part)" in out
