"""``prism-deploy parity ADAPTER --onnx OUT.onnx [--provider cpu|cuda|auto] [...] [--json]``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prism_deploy.cli.numbers import COUNT, SEED, number
from prism_deploy.cli.output import print_json, print_table
from prism_deploy.core.limits import Limit


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "parity",
        help="compare an exported ONNX graph with the PyTorch reference",
        epilog="prism-deploy parity --chain FILE (or --pipeline ...) checks a chain of models end to end "
        "(options: prism-deploy parity-pipeline --help)",
    )
    p.add_argument("adapter", help="adapter .safetensors file (format v1)")
    p.add_argument("--onnx", required=True, help="the graph written by prism-deploy export")
    p.add_argument(
        "--provider",
        default="auto",
        choices=("cpu", "cuda", "auto"),
        help="ONNX Runtime provider; cuda only where a GPU is present (auto: cuda if possible)",
    )
    p.add_argument("--samples", type=number(COUNT), default=4, help="random input batches (default 4)")
    p.add_argument("--batch", type=number(Limit(int, 1, 1 << 16)), default=2)
    p.add_argument("--seq", type=number(COUNT), default=16)
    p.add_argument("--inputs", metavar="FILE", help="model-A hidden states [n, in_dim] instead of random inputs")
    p.add_argument("--seed", type=number(SEED), default=0)
    p.add_argument(
        "--twin",
        default="semantics",
        choices=("semantics", "host"),
        help="a fused graph (export --plugin) runs on the CPU with its tile_dispatch nodes computed by "
        "numpy (semantics) or by the CUDA kernel's own source compiled for the CPU (host)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run, needs=("torch",))


def run(args: argparse.Namespace) -> int:
    from prism_deploy.core.errors import CheckFailed, PrismInputError
    from prism_deploy.core.targets import gpu_present, resolve_provider
    from prism_deploy.parity import check_parity
    from prism_deploy.reference import load_adapter
    from prism_deploy.runtime.adapter_session import AdapterGraph

    provider, why = resolve_provider(args.provider)
    if args.provider == "auto" and provider != "cpu" and _is_fused_file(args.onnx):
        provider, why = "cpu", "a fused graph runs on ONNX Runtime only on the CPU, through the op's twin"
    adapter = load_adapter(args.adapter)
    runner = AdapterGraph(args.onnx, provider, twin=args.twin)
    meta = runner.metadata
    if meta is None:
        raise PrismInputError(
            f"{args.onnx}: the model has no 'prism.lowering' metadata: not written by prism-deploy export"
        )
    # said once the inputs are known to be good; "auto" on a machine without a GPU is no news
    if args.provider != "cpu" and provider == "cpu" and (args.provider == "cuda" or gpu_present()):
        print(f"note: {why}", file=sys.stderr)
    if (meta["in_dim"], meta["out_dim"]) != (adapter.in_dim, adapter.out_dim):
        raise PrismInputError(
            f"{args.onnx}: graph is {meta['in_dim']} -> {meta['out_dim']}, adapter "
            f"{args.adapter} is {adapter.in_dim} -> {adapter.out_dim}"
        )
    report = check_parity(
        adapter, runner, inputs=args.inputs, samples=args.samples, batch=args.batch, seq=args.seq, seed=args.seed
    )
    if args.json:
        out = report.to_json()
        out["provider"] = provider
        print_json(out)
    else:
        print_report(report, provider)
    if not report.passed:
        raise CheckFailed(f"parity of {args.onnx}: " + "; ".join(report.failures))
    return 0


def print_report(report: Any, provider: str) -> None:
    tol = report.tolerances
    print(f"parity: {report.runner} ({provider}), precision {report.precision}, {report.tokens} tokens")
    print_table(
        ["figure", "value", "tolerance"],
        [
            ["max abs error", f"{report.max_abs:.4g}", "-"],
            ["relative L2 error", f"{report.rel_l2:.4g}", f"<= {tol['rel_l2_max']:.3g}"],
            ["cosine similarity", f"{report.cosine:.8f}", f">= {tol['cosine_min']}"],
        ],
    )
    if report.selection:
        print()
        print_table(
            ["gated pipe", "top_k", "tokens", "ambiguous", "selection match", "tolerance"],
            [
                [
                    s["name"],
                    s["top_k"],
                    s["tokens"],
                    s["ambiguous"],
                    "-" if s["match_fraction"] is None else f"{s['match_fraction']:.4f}",
                    f">= {tol['selection_match_min']}",
                ]
                for s in report.selection
            ],
        )
        print(
            f"(ambiguous: k-th and (k+1)-th reference scores closer than {tol['score_rounding']:g} * "
            "||x * max|gate weights| ||; not counted as mismatches)"
        )
    if report.top_workers:
        print()
        print_table(
            ["pipe", "worker", "r", "c", "tile error", "relative"],
            [
                [w["name"], w["worker"], w["r"], w["c"], f"{w['error']:.4g}", f"{w['relative']:.4g}"]
                for w in report.top_workers
            ],
        )
    for n in report.notes:
        print(f"note: {n}")
    print("PASSED" if report.passed else "FAILED: " + "; ".join(report.failures))


def _is_fused_file(path: str) -> bool:
    import onnx

    from prism_deploy.fuse import is_fused

    try:
        return is_fused(onnx.load_model(path, load_external_data=False))
    except Exception:  # not a model: AdapterGraph says so with one clean line
        return False
