"""Write the benchmark models of issue 18 as local Hugging Face folders, seeded, so that
results can be reproduced.

    python benchmarks/make_models.py [-o build/bench-models] [model-a] [model-b] [model-l]

- ``model-b``: Qwen2-like, hidden 640, 8 layers, 10 heads of 64 (2 KV heads), MLP 1664,
  vocabulary 32,000, untied LM head: 74.4 M parameters, of which a decoding step reads all
  but the input embedding table (20.5 M, one row per token): 33.4 M in the layers + 20.5 M in
  the LM head = 53.9 M weights, about 216 MB in float32 (the issue's "about 216 MB a token").
- ``model-a``: Llama-like, hidden 512, 8 layers, 8 heads of 64 (2 KV heads), MLP 1408,
  vocabulary 32,000.
- ``model-l`` (issue 28; not made unless named: 3.3 GB): TinyLlama-shaped, hidden 2048,
  16 layers, 32 heads of 64 (4 KV heads), MLP 5632, vocabulary 32,000, untied LM head:
  16 x (2 x 2048^2 + 2 x 2048 x 256 + 3 x 2048 x 5632) + 2 x 32,000 x 2048 + norms
  = 704.6 M + 131.1 M = 835.7 M parameters.

Weights are the transformers initialisation under ``torch.manual_seed`` (1 for A, 2 for B):
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


def make(name: str, folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if name == "model-b":
        torch.manual_seed(2)
        model = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=VOCAB,
                hidden_size=640,
                intermediate_size=1664,
                num_hidden_layers=8,
                num_attention_heads=10,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                tie_word_embeddings=False,
                bos_token_id=None,
                eos_token_id=0,
                pad_token_id=0,
            )
        )
    elif name == "model-a":
        torch.manual_seed(1)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=512,
                intermediate_size=1408,
                num_hidden_layers=8,
                num_attention_heads=8,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                tie_word_embeddings=False,
                bos_token_id=None,
                eos_token_id=0,
                pad_token_id=0,
            )
        )
    elif name == "model-l":
        torch.manual_seed(3)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=2048,
                intermediate_size=5632,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=4,
                max_position_embeddings=2048,
                tie_word_embeddings=False,
                bos_token_id=None,
                eos_token_id=0,
                pad_token_id=0,
            )
        )
    else:
        raise SystemExit(f"unknown model {name!r}: model-a, model-b or model-l")
    model.save_pretrained(str(folder))
    _tokenizer(folder)
    return folder


def _tokenizer(folder: Path) -> None:
    # the tests' tokenizer maker: a byte-level BPE on a few sentences, padded to nothing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.model_helpers import make_tokenizer

    make_tokenizer(folder, 512)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", default="build/bench-models", help="output folder")
    parser.add_argument("names", nargs="*", default=["model-a", "model-b"], help="which (model-a, model-b, model-l)")
    args = parser.parse_args(argv)
    for name in args.names:
        path = make(name, Path(args.out) / name)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
