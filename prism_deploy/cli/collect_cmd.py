"""``prism-deploy collect --model-a HF_DIR --model-b HF_DIR --text FILE -o pairs.safetensors``."""

from __future__ import annotations

import argparse

from prism_deploy.cli.output import print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("collect", help="paired activations for `fit`: X = model A hidden states, Z = model B embeddings")
    p.add_argument("--model-a", required=True, metavar="HF_DIR", help="model A's local Hugging Face folder")
    p.add_argument("--model-b", required=True, metavar="HF_DIR", help="model B's local Hugging Face folder")
    p.add_argument("--tokenizer-a", metavar="DIR", help="model A's tokenizer folder (default: --model-a)")
    p.add_argument("--tokenizer-b", metavar="DIR", help="model B's tokenizer folder (default: --model-b)")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file, one text per non-empty line")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="output .safetensors with tensors X and Z")
    p.add_argument("--pool", default="last", choices=("last", "mean", "tokens"),
                   help="one row per text (last token / mean) or per model-A token aligned by char offsets")
    p.add_argument("--max-seq", type=int, default=512, metavar="N", help="truncate texts to N tokens (default 512)")
    p.add_argument("--batch", type=int, default=8, metavar="N", help="texts per forward pass (default 8)")
    p.add_argument("--json", action="store_true", help="print what was written as one JSON object")
    p.set_defaults(func=run, needs=("torch", "transformers"))


def run(args: argparse.Namespace) -> int:
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.models.collect import collect_pairs, read_texts, save_pairs

    if not str(args.output).endswith(".safetensors"):
        raise PrismInputError(f"-o: {args.output}: the output must be a .safetensors file")
    texts = read_texts(args.text)
    x, z, info = collect_pairs(args.model_a, args.model_b, texts, pool=args.pool, max_seq=args.max_seq, batch=args.batch,
                               tokenizer_a=args.tokenizer_a, tokenizer_b=args.tokenizer_b)
    save_pairs(args.output, x, z, info)
    info["output"] = str(args.output)
    if args.json:
        print_json(info)
    else:
        print(f"{args.output}: X {list(x.shape)} (model A hidden), Z {list(z.shape)} (model B embeddings), "
              f"pool {args.pool}, {info['texts']} texts"
              + (f", {info['skipped_texts']} skipped (no tokens)" if info["skipped_texts"] else "")
              + (f", {info['truncated_texts']} truncated to {args.max_seq} tokens" if info["truncated_texts"] else ""))
        print("tensors: X (model A hidden states, the fit inputs) and Z (model B embeddings, the targets)")
    return 0
