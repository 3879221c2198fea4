"""``prism-deploy export-model HF_DIR|FILE.gguf --role first|middle|last -o DIR [--precision fp32|fp16|int8|int4] [--max-seq N] [--json]``.

With ``int8``/``int4``: ``[--form nbits|dq] [--block-size N] [--asymmetric] [--accuracy-level L]
[--quantize-embedding]`` (docs/quantized-models.md).
"""

from __future__ import annotations

import argparse

from prism_deploy.cli.numbers import COUNT, number
from prism_deploy.cli.output import print_json, print_table
from prism_deploy.cli.paths import declare_outputs
from prism_deploy.core.limits import Limit
from prism_deploy.core.precision import MODEL_PRECISIONS
from prism_deploy.format.model_folder import ROLE_ALIASES, ROLES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export-model", help="export a local causal LM as a chain's first, middle or last model")
    p.add_argument("hf_dir", metavar="HF_DIR", help="local Hugging Face model folder, or a .gguf file (its weights dequantized; nothing is downloaded)")
    p.add_argument("--role", required=True, choices=(*ROLES, *ROLE_ALIASES), metavar="{" + ",".join(ROLES) + "}",
                   help="first: token ids -> final hidden states; middle: embeddings -> final hidden states; "
                        "last: embeddings -> logits, with a KV-cache graph for generation "
                        "(upper and lower are the old names of first and last)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (graphs and model.json)")
    p.add_argument("--precision", default="fp32", choices=MODEL_PRECISIONS,
                   help="int8/int4: weight-only quantized MatMul weights and LM head, float activations")
    q = p.add_argument_group("int8 / int4 (docs/quantized-models.md)")
    q.add_argument("--form", default=None, choices=("nbits", "dq"),
                   help="nbits (default): MatMulNBits, for ONNX Runtime; dq: DequantizeLinear -> MatMul, for TensorRT")
    q.add_argument("--block-size", type=number(Limit(int, 1, 1 << 16)), default=None, metavar="N",
                   help="weights per scale along K: 16, 32, 64, 128 or 256 (default 32; int8 dq is per channel)")
    q.add_argument("--asymmetric", action="store_true", help="zero points per block (nbits form only)")
    q.add_argument("--accuracy-level", type=number(Limit(int, 0, 4)), default=None, metavar="L",
                   help="MatMulNBits accuracy_level: 0 float compute, 4 int8 compute on CPU (default 4; nbits only)")
    q.add_argument("--quantize-embedding", action="store_true",
                   help="also quantize embedding tables that the graph gathers from (int4, nbits form)")
    p.add_argument("--max-seq", type=number(COUNT), default=None, metavar="N",
                   help="longest sequence the pipeline will accept (default: the model's limit, at most 2048)")
    p.add_argument("--text", metavar="FILE", default=None,
                   help="UTF-8 text for the real-text validation, paragraphs separated by blank lines (every fifth "
                        "held out and used; default: the prose of Python's pydoc_data.topics, docs/real-models.md)")
    p.add_argument("--json", action="store_true", help="print the manifest as one JSON object")
    p.add_argument("--force", action="store_true",
                   help="export into a folder holding files export-model did not write (they are kept)")
    declare_outputs(p, files=(), folders=("output",))
    p.set_defaults(func=run, needs=("torch", "transformers"))


def quantization_spec(args: argparse.Namespace) -> object | None:
    """The checked quantization options, or None for a float precision (where giving any is bad input)."""
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.models import quantize

    given = [flag for flag, value in (("--form", args.form), ("--block-size", args.block_size),
                                      ("--asymmetric", args.asymmetric), ("--accuracy-level", args.accuracy_level),
                                      ("--quantize-embedding", args.quantize_embedding)) if value not in (None, False)]
    if args.precision not in quantize.BITS:
        if given:
            raise PrismInputError(f"{given[0]}: only with --precision int8 or int4")
        return None
    return quantize.make_spec(args.precision, form=args.form or "nbits", block_size=args.block_size,
                              symmetric=not args.asymmetric, accuracy_level=args.accuracy_level,
                              embedding=args.quantize_embedding)


def run(args: argparse.Namespace) -> int:
    import sys

    from prism_deploy.models.export import export_model

    if args.role in ROLE_ALIASES:
        print(f"note: --role {args.role} is now called --role {ROLE_ALIASES[args.role]}", file=sys.stderr)
    spec = quantization_spec(args)  # checked before the model is loaded
    manifest = export_model(args.hf_dir, args.role, args.output, precision=args.precision, max_seq=args.max_seq,
                            quantization=spec, force=args.force, text=args.text)
    if args.json:
        print_json(manifest)
        return 0
    dims = manifest["dims"]
    print(f"{args.hf_dir}: {manifest['family']} exported as {manifest['role']} ({manifest['precision']}) to {args.output} "
          f"in {manifest['export_seconds']:.1f} s; hidden {dims['hidden']}, vocab {dims['vocab']}, "
          f"{dims['layers']} layers, max seq {manifest['max_seq']}")
    rows = []
    for output, fig in manifest["validation"].items():
        if not isinstance(fig, dict) or "tokens" not in fig:
            continue
        rows.append([output, fig["tokens"], f"{fig['max_abs']:.3g}", f"{fig['rel_l2']:.3g}", f"{fig['min_cosine']:.6f}",
                     f"{fig['top1']:.3f}" if "top1" in fig else "-", f"{fig['kl_max']:.3g}" if "kl_max" in fig else "-"])
    validation = manifest["validation"]
    real = validation.get("real_text")
    gated = validation.get("random_inputs", "gated") == "gated"
    print("validation against transformers on ONNX Runtime CPU (random inputs, one left-padded row"
          + ("" if gated else "; reported, not gated: real text gates a language model") + "):")
    print_table(["output", "tokens", "max abs", "rel L2", "min cosine", "top-1", "KL max"], rows)
    if real:
        fig, nt = real["output"], real["next_token"]
        print(f"on real text ({real['corpus']['name']}, held-out part, {nt['tokens']} tokens): rel L2 {fig['rel_l2']:.3g}, "
              f"min cosine {fig['min_cosine']:.6f}, next-token top-1 agreement {nt['agreement']:.3f}, perplexity "
              f"{nt['perplexity']:.3f} vs {nt['perplexity_reference']:.3f} float32 (x{nt['perplexity_ratio']:.4f})"
              + ("" if real["language_model"] else "; the model does not predict the text (perplexity not gated)"))
    q = manifest.get("quantization")
    if q:
        block = "per channel" if q["block_size"] is None else f"block {q['block_size']}"
        print(f"quantized: {manifest['precision']} {q['form']}, {block}, {'symmetric' if q['symmetric'] else 'asymmetric'}"
              + (f", accuracy level {q['accuracy_level']}" if q["accuracy_level"] is not None else "") + "; "
              + "; ".join(f"{key}: {sum('quantized' in x for x in g['layers'])} weights quantized, "
                          f"{sum('kept' in x for x in g['layers'])} kept float, "
                          f"{g['quantized_bytes_float'] / 2**20:.2f} -> {g['quantized_bytes'] / 2**20:.2f} MiB"
                          for key, g in q["graphs"].items())
              + " (model.json lists each weight)")
    if not manifest["known_family"]:
        print(f"note: family {manifest['family']!r} is not one of the tested ones; the validation above passed")
    return 0
