"""``prism-deploy export-model HF_DIR --role first|middle|last -o DIR [--precision ...] [--max-seq N] [--json]``."""

from __future__ import annotations

import argparse

from prism_deploy.cli.output import print_json, print_table
from prism_deploy.core.precision import MODEL_PRECISIONS
from prism_deploy.format.model_folder import ROLE_ALIASES, ROLES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export-model", help="export a local causal LM as a chain's first, middle or last model")
    p.add_argument("hf_dir", metavar="HF_DIR", help="local Hugging Face model folder (nothing is downloaded)")
    p.add_argument("--role", required=True, choices=(*ROLES, *ROLE_ALIASES), metavar="{" + ",".join(ROLES) + "}",
                   help="first: token ids -> final hidden states; middle: embeddings -> final hidden states; "
                        "last: embeddings -> logits, with a KV-cache graph for generation "
                        "(upper and lower are the old names of first and last)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (graphs and model.json)")
    p.add_argument("--precision", default="fp32", choices=MODEL_PRECISIONS)
    p.add_argument("--max-seq", type=int, default=None, metavar="N",
                   help="longest sequence the pipeline will accept (default: the model's limit, at most 2048)")
    p.add_argument("--json", action="store_true", help="print the manifest as one JSON object")
    p.set_defaults(func=run, needs=("torch", "transformers"))


def run(args: argparse.Namespace) -> int:
    import sys

    from prism_deploy.models.export import export_model

    if args.role in ROLE_ALIASES:
        print(f"note: --role {args.role} is now called --role {ROLE_ALIASES[args.role]}", file=sys.stderr)
    manifest = export_model(args.hf_dir, args.role, args.output, precision=args.precision, max_seq=args.max_seq)
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
                     f"{fig['top1']:.3f}" if "top1" in fig else "-"])
    print("validation against transformers on ONNX Runtime CPU (random inputs, one left-padded row):")
    print_table(["output", "tokens", "max abs", "rel L2", "min cosine", "top-1"], rows)
    if not manifest["known_family"]:
        print(f"note: family {manifest['family']!r} is not one of the tested ones; the validation above passed")
    return 0
