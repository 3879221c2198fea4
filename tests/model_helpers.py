"""Tiny local causal LMs for tests: random 2-layer Llama (hidden 64), Qwen2 (hidden 96) and
GPT-2 (hidden 48) models from configs, with byte-level BPE tokenizers trained on a few
sentences. Nothing is downloaded. Used by tests/models/test_models.py and tests/builder/test_model_source.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Adapters map hidden states of one model to the embeddings of another.",
    "Tiles of weights are routed per token by a small gate.",
    "ONNX Runtime runs the exported graphs on the CPU of this machine.",
    "Greedy decoding picks the most likely token at every step.",
    "Byte-level tokenizers never meet an unknown character: caf\u00e9, na\u00efve, \u00fcber.",
]


def make_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    assert len(fast) <= vocab_size
    fast.save_pretrained(str(folder))


def make_model(kind: str, folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed({"llama": 1, "qwen2": 2, "gpt2": 3}[kind])
    if kind == "llama":
        vocab = 300
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                bos_token_id=None,
                eos_token_id=0,
                pad_token_id=0,
            )
        )
    elif kind == "qwen2":
        vocab = 320
        model = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=vocab,
                hidden_size=96,
                intermediate_size=192,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                bos_token_id=None,
                eos_token_id=0,
                pad_token_id=0,
                tie_word_embeddings=False,
            )
        )
    else:
        vocab = 280
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_embd=48,
                n_layer=2,
                n_head=4,
                n_positions=128,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=0,
            )
        )
    model.save_pretrained(str(folder))
    make_tokenizer(folder, vocab)
    return folder


def sentencepiece_view(hf_dir: Path, out: Path, vocab_size: int = 100) -> Path:
    """A view of the Hugging Face folder ``hf_dir`` that llama.cpp's converter accepts: its
    config and weights linked, its tokenizer replaced by a SentencePiece model trained on the
    same sentences (needs ``sentencepiece``). The converter recognises a byte-level BPE
    tokenizer only by the hash of a known one, which these trained tokenizers never match; with
    a SentencePiece model it pads the vocabulary to the config's. The GGUF's vocabulary is then
    not the folder's tokenizer: fine where token ids are fed (the bench's peers)."""
    import io

    import sentencepiece

    out.mkdir(parents=True, exist_ok=True)
    for f in hf_dir.iterdir():
        if f.is_file() and not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            (out / f.name).symlink_to(f.resolve())
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    return out
