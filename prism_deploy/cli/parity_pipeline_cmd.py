"""``prism-deploy parity --pipeline`` (also spelled ``parity-pipeline``): the exported chain against
transformers A + the reference adapter + transformers B."""

from __future__ import annotations

import argparse

from prism_deploy.cli.output import print_json, print_table
from prism_deploy.cli.pipeline_inputs import add_input_arguments, read_inputs
from prism_deploy.cli.run_cmd import add_pipeline_arguments
from prism_deploy.core.precision import PIPELINE_TOLERANCE_SETS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("parity-pipeline", help="end-to-end parity of model A -> adapter -> model B against PyTorch")
    add_pipeline_arguments(p)
    p.add_argument("--model-a-hf", required=True, metavar="DIR", help="model A's local Hugging Face folder")
    p.add_argument("--model-b-hf", required=True, metavar="DIR", help="model B's local Hugging Face folder")
    p.add_argument("--adapter-file", metavar="FILE",
                   help="the adapter .safetensors for the reference (default: --adapter when it is one)")
    add_input_arguments(p, required=False)
    p.add_argument("--batch", type=int, default=2, help="random inputs: rows (default 2)")
    p.add_argument("--seq", type=int, default=16, help="random inputs: tokens per row (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", choices=PIPELINE_TOLERANCE_SETS, default=None,
                   help="tolerance set (default: from the least precise part)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run, needs=("torch", "transformers"))


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from prism_deploy.core.errors import CheckFailed, PrismInputError
    from prism_deploy.parity.pipeline import check_pipeline_parity
    from prism_deploy.runtime.pipeline import Pipeline

    reference_adapter = args.adapter_file or args.adapter
    if not str(reference_adapter).endswith(".safetensors"):
        raise PrismInputError("--adapter-file: the reference needs the adapter .safetensors (--adapter is not one)")
    if args.batch < 1 or args.seq < 1:
        raise PrismInputError("--batch and --seq must be at least 1")
    pipe = Pipeline(args.model_a, args.adapter, args.model_b, target=args.target, adapter_precision=args.adapter_precision)
    if args.text is not None or args.ids is not None:
        ids, mask = read_inputs(args)
    else:
        rng = np.random.default_rng(args.seed)
        ids = rng.integers(0, pipe.upper.vocab, size=(args.batch, min(args.seq, pipe.max_seq)), dtype=np.int64)
        mask = None
    report = check_pipeline_parity(args.model_a_hf, reference_adapter, args.model_b_hf, pipe, ids, mask,
                                   tolerance=args.tolerance)
    if args.json:
        print_json(report)
    else:
        print(f"pipeline on {pipe.provider} ({pipe.target}), adapter runner {pipe.adapter_kind}; "
              f"{report['tokens']} tokens; tolerance set {report['precision']}")
        rows = []
        for stage in ("hidden", "adapted", "logits"):
            f = report[stage]
            rows.append([stage, f"{f['max_abs']:.3g}", f"{f['rel_l2']:.3g}", f"{f['min_cosine']:.6f}",
                         f"{f['kl_mean']:.3g}" if "kl_mean" in f else "-", f"{f['kl_max']:.3g}" if "kl_max" in f else "-",
                         f"{f['top1']:.3f}" if "top1" in f else "-"])
        print_table(["stage", "max abs", "rel L2", "min cosine", "KL mean", "KL max", "top-1"], rows)
        tol = report["tolerances"]
        print(f"tolerances: logits rel L2 <= {tol['rel_l2_max']:g}, KL max <= {tol['kl_max']:g}, top-1 >= {tol['top1_min']:g}")
    if not report["passed"]:
        raise CheckFailed("pipeline parity: " + "; ".join(report["failures"]))
    if not args.json:
        print("parity: passed")
    return 0
