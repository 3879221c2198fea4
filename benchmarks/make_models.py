"""Write the benchmark models of issue 18 as local Hugging Face folders, seeded, so that
results can be reproduced.

    python benchmarks/make_models.py [-o build/bench-models] [--gguf LLAMA_CPP_SRC] [model-a] [model-b] [model-l]

- ``model-b``: Qwen2-like, hidden 640, 8 layers, 10 heads of 64 (2 KV heads), MLP 1664,
  vocabulary 32,000, untied LM head: 74.4 M parameters, of which a decoding step reads all
  but the input embedding table (20.5 M, one row per token): 33.4 M in the layers + 20.5 M in
  the LM head = 53.9 M weights, about 216 MB in float32 (the issue's "about 216 MB a token").
- ``model-a``: Llama-like, hidden 512, 8 layers, 8 heads of 64 (2 KV heads), MLP 1408,
  vocabulary 32,000.
- ``model-l``: TinyLlama-shaped Llama, hidden 2048, 16 layers, 32 heads of 64 (4 KV heads), MLP
  5632, vocabulary 32,000, untied LM head, 2,048 positions: a layer holds 2048 x 2048 x 2 (q, o)
  + 2048 x 256 x 2 (k, v) + 2048 x 5632 x 3 (MLP) + 2 x 2048 (norms) = 44,044,288 weights, 16 of
  them 704,708,608; the embedding table and the LM head 32,000 x 2048 = 65,536,000 each; the
  final norm 2,048: 835,782,656 parameters (836 M), 3.34 GB in float32, of which a decoding step
  reads all but the embedding table: 770,246,656 weights, 3.08 GB. Not made by default (its size):
  ``python benchmarks/make_models.py model-l``.

``--gguf LLAMA_CPP_SRC`` also writes ``NAME-f32.gguf`` beside each folder, for ``bench --model
--gguf`` (the llama.cpp peer), by llama.cpp's converter (``LLAMA_CPP_SRC``: the llama-cpp-python
sdist's ``vendor/llama.cpp``, docs/real-models.md). The converter knows a byte-level BPE
tokenizer only by the hash of a published one, so it converts a view of the folder with a
SentencePiece stand-in tokenizer (``tests/model_helpers.sentencepiece_view``, needs
``sentencepiece``): the GGUF's vocabulary is not the folder's tokenizer, which does not matter to
the bench (it feeds token ids) but does to any use of text.

Weights are the transformers initialisation under ``torch.manual_seed`` (1 for A, 2 for B, 3 for L):
random, so the figures say nothing about a trained model's accuracy under quantization, only
about speed and the lowering. Each folder gets a byte-level BPE tokenizer trained on a few
sentences (as the tests' models), so ``prism-deploy run --text`` works on them. ``build/`` is
ignored by git; nothing here is committed but this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

VOCAB = 32000
NAMES = ("model-a", "model-b", "model-l")
DEFAULT_NAMES = ["model-a", "model-b"]  # model-l (3.3 GB) only when named


# name -> (seed, family, width, MLP width, layers, heads, KV heads); the rest is shared (COMMON)
SHAPES = {
    "model-a": (1, "llama", 512, 1408, 8, 8, 2),
    "model-b": (2, "qwen2", 640, 1664, 8, 10, 2),
    "model-l": (3, "llama", 2048, 5632, 16, 32, 4),
}
COMMON = dict(
    vocab_size=VOCAB,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=0,
    pad_token_id=0,
)


def make(name: str, folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if name not in SHAPES:
        raise SystemExit(f"unknown model {name!r}: {', '.join(NAMES)}")
    seed, family, hidden, mlp, layers, heads, kv_heads = SHAPES[name]
    config_class, model_class = (
        (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    )
    torch.manual_seed(seed)
    model = model_class(
        config_class(
            hidden_size=hidden,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            **COMMON,
        )
    )
    model.save_pretrained(str(folder))
    _tokenizer(folder)
    return folder


def _tokenizer(folder: Path) -> None:
    # the tests' tokenizer maker: a byte-level BPE on a few sentences, padded to nothing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.model_helpers import make_tokenizer

    make_tokenizer(folder, 512)


def write_gguf(folder: Path, llama_cpp_src: Path) -> Path:
    """``folder`` as ``<folder>-f32.gguf`` beside it (llama.cpp's converter on a view of it with a
    SentencePiece stand-in tokenizer: see the module docstring)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from prism_deploy.bench.llamacpp import convert_hf_to_gguf
    from tests.model_helpers import sentencepiece_view

    out = folder.parent / f"{folder.name}-f32.gguf"
    with tempfile.TemporaryDirectory(prefix="gguf-view-") as view:
        convert_hf_to_gguf(llama_cpp_src, sentencepiece_view(folder, Path(view) / folder.name), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", default="build/bench-models", help="output folder")
    parser.add_argument(
        "--gguf", metavar="LLAMA_CPP_SRC", help="also write NAME-f32.gguf by llama.cpp's converter found here"
    )
    parser.add_argument(
        "names",
        nargs="*",
        default=DEFAULT_NAMES,
        help=f"which ({', '.join(NAMES)}; default: {' '.join(DEFAULT_NAMES)})",
    )
    args = parser.parse_args(argv)
    for name in args.names:
        if name not in NAMES:
            parser.error(f"unknown model {name!r}: {', '.join(NAMES)}")
    for name in args.names:
        path = make(name, Path(args.out) / name)
        print(f"wrote {path}")
        if args.gguf:
            print(f"wrote {write_gguf(path, Path(args.gguf))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
