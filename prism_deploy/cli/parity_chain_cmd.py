"""``prism-deploy parity --chain FILE [--bisect]`` and ``parity --pipeline ...`` (the two-model
spelling): a chain against transformers models and the reference adapters, end to end and hop by
hop (``prism_deploy.parity.chain_parity``)."""

from __future__ import annotations

import argparse
from typing import Any

from prism_deploy.cli.numbers import COUNT, COUNT_OR_ZERO, SEED, number
from prism_deploy.cli.output import print_json, print_table
from prism_deploy.cli.pipeline_inputs import add_input_arguments, read_inputs
from prism_deploy.cli.run_cmd import add_chain_arguments, open_chain
from prism_deploy.core.limits import Limit
from prism_deploy.core.precision import PIPELINE_TOLERANCE_SETS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "parity-chain",
        aliases=["parity-pipeline"],
        help="end-to-end and hop-by-hop parity of a chain against PyTorch "
        "(also: prism-deploy parity --chain / --pipeline)",
    )
    add_chain_arguments(p)
    p.add_argument("--model-a-hf", metavar="DIR", help="two-model case: model A's local Hugging Face folder")
    p.add_argument("--model-b-hf", metavar="DIR", help="two-model case: model B's local Hugging Face folder")
    p.add_argument(
        "--adapter-file",
        metavar="FILE",
        help="two-model case: the adapter .safetensors for the reference (default: --adapter when it is one)",
    )
    add_input_arguments(p, required=False)
    p.add_argument("--batch", type=number(Limit(int, 1, 1 << 16)), default=2, help="random inputs: rows (default 2)")
    p.add_argument("--seq", type=number(COUNT), default=16, help="random inputs: tokens per row (default 16)")
    p.add_argument("--seed", type=number(SEED), default=0)
    p.add_argument(
        "--new-tokens",
        type=number(COUNT_OR_ZERO),
        default=0,
        metavar="N",
        help="also compare N greedy tokens with a greedy loop over the reference chain (default 0)",
    )
    p.add_argument(
        "--bisect",
        action="store_true",
        help="print the bisection line also when the chain passes (it runs whenever the chain "
        "fails: the first stage out of tolerance, and inside it the pipe and workers or the graph)",
    )
    p.add_argument(
        "--tolerance",
        choices=PIPELINE_TOLERANCE_SETS,
        default=None,
        help="end-to-end tolerance set (default: from the least precise part)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run, needs=("torch", "transformers"))


def references(args: argparse.Namespace, chain: Any) -> tuple[list[Any], list[Any]]:
    """The Hugging Face folders of the models and the .safetensors of the adapters, from the
    chain file (``hf``, ``reference``) or the two-model options."""
    from prism_deploy.core.errors import PrismInputError

    if chain.spec is None:
        reference_adapter = args.adapter_file or args.adapter
        if not str(reference_adapter).endswith(".safetensors"):
            raise PrismInputError("--adapter-file: the reference needs the adapter .safetensors (--adapter is not one)")
        if not args.model_a_hf or not args.model_b_hf:
            raise PrismInputError(
                "--model-a-hf and --model-b-hf: the reference needs both models' Hugging Face folders"
            )
        return [args.model_a_hf, args.model_b_hf], [reference_adapter]
    models, adapters = [], []
    for s in chain.spec.stages:
        if s.kind == "model":
            if s.hf is None:
                raise PrismInputError(
                    f"{chain.spec.where()}: {s.label}: parity needs its Hugging Face folder (hf = ...)"
                )
            models.append(s.hf)
        else:
            ref = s.reference or (s.path if s.path.suffix == ".safetensors" else None)
            if ref is None:
                raise PrismInputError(
                    f"{chain.spec.where()}: {s.label}: parity needs the adapter's .safetensors (reference = ...)"
                )
            adapters.append(ref)
    return models, adapters


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from prism_deploy.core.errors import CheckFailed, PrismInputError
    from prism_deploy.parity.chain_parity import check_chain_parity

    if args.batch < 1 or args.seq < 1:
        raise PrismInputError("--batch and --seq must be at least 1")
    if args.new_tokens < 0:
        raise PrismInputError(f"--new-tokens: {args.new_tokens} must be >= 0")
    chain = open_chain(args)
    if args.graph is not None:
        from prism_deploy.parity.graph_parity import ReferenceGraph

        reference: Any = ReferenceGraph(chain.spec)
    else:
        from prism_deploy.parity.chain_parity import ReferenceChain

        reference = ReferenceChain(*references(args, chain))
    if args.text is not None or args.ids is not None:
        ids, mask = read_inputs(args, chain)
    else:
        rng = np.random.default_rng(args.seed)
        ids = rng.integers(0, chain.first.vocab, size=(args.batch, min(args.seq, chain.max_seq)), dtype=np.int64)
        mask = None
    if args.graph is not None:
        from prism_deploy.parity.graph_parity import check_graph_parity

        report = check_graph_parity(
            chain, reference, ids, mask, tolerance=args.tolerance, new_tokens=args.new_tokens, bisect=args.bisect
        )
    else:
        report = check_chain_parity(
            chain, reference, ids, mask, tolerance=args.tolerance, new_tokens=args.new_tokens, bisect=args.bisect
        )
    if args.json:
        print_json(report)
    else:
        print_report(report)
    if not report["passed"]:
        raise CheckFailed(f"{'graph' if args.graph is not None else 'chain'} parity: " + "; ".join(report["failures"]))
    if not args.json:
        print("parity: passed")
    return 0


def print_report(report: dict[str, Any]) -> None:
    what = "graph" if "graph" in report else "chain"
    chain = report[what]
    print(
        f"{what} on {chain['provider']} ({chain['target']}), {len(chain['stages'])} stages; {report['tokens']} tokens; "
        f"tolerance set {report['precision']}"
    )
    rows = []
    for h in report["stages"]:
        rows.append(
            [
                h["stage"],
                h["name"],
                h["kind"],
                h["precision"],
                f"{h['max_abs']:.3g}",
                f"{h['rel_l2']:.3g}",
                f"{h['min_cosine']:.6f}",
                f"{h['top1']:.3f}" if "top1" in h else "-",
                f"<= {h['tolerances']['rel_l2_max']:g}",
                "pass" if h["passed"] else "FAIL",
            ]
        )
    if what == "graph":
        for row, h in zip(rows, report["stages"]):
            row.insert(2, h["edge"])
        print("per edge (each stage on the reference's own inputs):")
        print_table(
            [
                "#",
                "stage",
                "edge",
                "kind",
                "precision",
                "max abs",
                "rel L2",
                "min cosine",
                "top-1",
                "rel L2 bound",
                "stage",
            ],
            rows,
        )
    else:
        print("per hop (each stage on the reference's own input):")
        print_table(
            ["#", "stage", "kind", "precision", "max abs", "rel L2", "min cosine", "top-1", "rel L2 bound", "hop"], rows
        )
    f, tol = report["logits"], report["tolerances"]
    print(
        f"end to end: logits rel L2 {f['rel_l2']:.3g} (<= {tol['rel_l2_max']:g}), KL mean {f['kl_mean']:.3g} "
        f"max {f['kl_max']:.3g} (<= {tol['kl_max']:g}), top-1 {f['top1']:.3f} (>= {tol['top1_min']:g})"
    )
    if "greedy" in report:
        greedy = report["greedy"]
        print(
            f"greedy tokens: {greedy['match']:.3f} agree with the reference {what}'s ({greedy['new_tokens']} new tokens)"
            + ("" if greedy.get("judged", True) else f"; {greedy['why']}")
        )
    bisect = report.get("bisect")
    if bisect:
        print(f"bisect: {bisect.get('summary', 'nothing out of tolerance')}")
        for w in [w for w in bisect.get("workers", []) if w["error"] != 0][:5]:  # the ones to blame
            print(
                f"  pipe {w['pipe']} ({w['name']}) worker {w['worker']} (r {w['r']}, c {w['c']}): "
                f"error {w['error']:.4g}, relative {w['relative']:.4g}"
            )
