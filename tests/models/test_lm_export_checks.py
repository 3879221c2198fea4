"""What ``export-model`` (and every load of a Hugging Face folder) refuses before exporting: a
checkpoint whose keys do not match its config (transformers would fill the gap with random
weights and the export would validate against the same random weights), a broken config.json,
an unreadable checkpoint. Each is exit 2 with one line naming the problem; nothing is written."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from prism_deploy.cli.main import main
from prism_deploy.core.errors import PrismInputError
from prism_deploy.models import hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.model_helpers import make_model

    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_model(kind, root / kind) for kind in ("llama", "gpt2")}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _refused(argv: list[str], capsys, *needles: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _layer_key(tensors: dict, layer: int) -> str:
    return next(k for k in sorted(tensors) if f".{layer}." in k)


KEY_CASES = {
    "a tensor removed": lambda t: t.pop(_layer_key(t, 1)),
    "a foreign tensor added": lambda t: t.update({"extra.weight": torch.zeros(2)}),
    "a tensor of another shape": lambda t: t.update({_layer_key(t, 0): torch.zeros(3, 3)}),
}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("case", sorted(KEY_CASES))
def test_checkpoint_keys_must_match_the_config(tiny, tmp_path, capsys, kind, case):
    folder = _copy(tiny[kind], tmp_path / "m")
    removed: list[str] = []

    def edit(tensors):
        before = set(tensors)
        KEY_CASES[case](tensors)
        removed.extend(sorted(before ^ set(tensors)) or [_layer_key(tensors, 0)])

    _edit_weights(folder, edit)
    # every role refuses it: the broken tensor is in the base model (or foreign to it)
    for role in ("first", "last"):
        err = _refused(
            ["export-model", str(folder), "--role", role, "-o", str(tmp_path / role), "--max-seq", "16"],
            capsys,
            str(folder),
            "does not match config.json",
        )
        assert any(name.split(".", 1)[-1] in err for name in removed), err
        assert not (tmp_path / role).exists()  # a folder it made is gone


@pytest.mark.parametrize("layers", [3, 1])
def test_num_hidden_layers_other_than_the_checkpoint(tiny, tmp_path, capsys, layers):
    folder = _copy(tiny["llama"], tmp_path / "m")
    _edit_config(folder, num_hidden_layers=layers)
    _refused(
        ["export-model", str(folder), "--role", "last", "-o", str(tmp_path / "o")],
        capsys,
        "model.layers.2." if layers == 3 else "model.layers.1.",
        "missing from the checkpoint" if layers == 3 else "not in the model",
    )


def test_a_tied_head_need_not_be_in_the_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=True,
        )
    ).save_pretrained(str(tmp_path / "tied"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tied" / "model.safetensors"), framework="pt") as fh:
        assert "lm_head.weight" not in fh.keys()
    model = hf.load_causal_lm(tmp_path / "tied")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.fixture(scope="module")
def sentence_bert(tmp_path_factory):
    """A BERT checkpoint as sentence-transformers saves it: the encoder and its pooler, no MLM head."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert") / "bert"
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(str(folder))
    return folder


def test_a_role_without_the_head_needs_no_head_keys(sentence_bert):
    model = hf.load_causal_lm(sentence_bert, uses_head=False)  # the pooler is allowed, the head unused
    assert model.config.model_type == "bert"
    with pytest.raises(PrismInputError, match=r"missing from the checkpoint: cls\.predictions"):
        hf.load_causal_lm(sentence_bert)  # as a last model, the random head would make its logits


def test_the_head_is_not_required_of_a_first_model(tiny, tmp_path):
    folder = _copy(tiny["llama"], tmp_path / "m")  # untied: lm_head.weight is its own tensor
    _edit_weights(folder, lambda t: t.pop("lm_head.weight"))
    hf.load_causal_lm(folder, uses_head=False)
    with pytest.raises(PrismInputError, match=r"missing from the checkpoint: lm_head\.weight"):
        hf.load_causal_lm(folder)


BROKEN_CONFIGS = [
    ({"eos_token_id": "zero"}, "eos_token_id"),
    ({"eos_token_id": 10_000}, "eos_token_id"),
    ({"num_attention_heads": 3}, "attention heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": -64}, "hidden_size"),
    ({"vocab_size": 10}, "model.embed_tokens.weight"),
    ({"vocab_size": 10**12}, "vocab_size"),
    ({"vocab_size": 1e12}, "vocab_size"),
    ({"vocab_size": 4_000_000}, "does not match the checkpoint"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
]


@pytest.mark.parametrize("changes,needle", BROKEN_CONFIGS, ids=[json.dumps(c) for c, _ in BROKEN_CONFIGS])
def test_a_broken_config_is_one_line(tiny, tmp_path, capsys, changes, needle):
    folder = _copy(tiny["llama"], tmp_path / "m")
    _edit_config(folder, **changes)
    _refused(["export-model", str(folder), "--role", "last", "-o", str(tmp_path / "o")], capsys, needle)
    assert not (tmp_path / "o").exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _pickle_instead(path: Path) -> None:
    path.unlink()
    with open(path.with_name("pytorch_model.bin"), "wb") as fh:
        pickle.dump({"weights": PrismInputError("a pickled object, not a tensor")}, fh)


BROKEN_CHECKPOINTS = {
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(bytes(range(256)) * 20),
    "truncated": _truncate,
    "json only": lambda p: p.write_bytes(b"{}"),
    "pickled bin": _pickle_instead,
}


@pytest.mark.parametrize("case", sorted(BROKEN_CHECKPOINTS))
def test_an_unreadable_checkpoint_is_one_line(tiny, tmp_path, capsys, case):
    folder = _copy(tiny["llama"], tmp_path / "m")
    BROKEN_CHECKPOINTS[case](folder / "model.safetensors")
    err = _refused(["export-model", str(folder), "--role", "first", "-o", str(tmp_path / "o")], capsys, str(folder))
    assert "weights_only` set to `False`" not in err  # no advice to run pickled code


def test_a_killed_exports_scratch_folders_are_removed_by_the_next(tiny, tmp_path, capsys):
    from prism_deploy.format.model_folder import TRACE_MARK

    out = tmp_path / "o"
    out.mkdir()
    left = out / ".trace-k1ll3d00"  # what a killed export leaves: its marked scratch folder
    left.mkdir()
    (left / TRACE_MARK).touch()
    (left / "model.onnx").write_bytes(b"partial")
    assert main(["export-model", str(tiny["gpt2"]), "--role", "first", "-o", str(out), "--max-seq", "16"]) == 0
    assert not left.exists() and not any(p.name.startswith((".trace-", ".export.lock")) for p in out.iterdir())
    users = out / ".trace-notours1"  # the same name pattern without the mark is not provably ours
    users.mkdir()
    _refused(
        ["export-model", str(tiny["gpt2"]), "--role", "first", "-o", str(out), "--max-seq", "16"],
        capsys,
        ".trace-notours1",
    )
    assert (
        main(["export-model", str(tiny["gpt2"]), "--role", "first", "-o", str(out), "--max-seq", "16", "--force"]) == 0
    )
    assert users.is_dir()  # kept
