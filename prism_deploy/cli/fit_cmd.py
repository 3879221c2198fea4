"""``prism-deploy fit --x X --z Z -o adapter.safetensors``: train an adapter by least squares."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from prism_deploy.cli.paths import declare_outputs


def number(name: str) -> Callable[[str], int | float]:
    """The argparse ``type`` of fit option ``name``, with its range from fit/option_ranges.py."""
    from prism_deploy.cli import numbers
    from prism_deploy.fit.option_ranges import LIMITS, flag

    return numbers.number(LIMITS[name], flag(name))


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=number("threads"),
        help="torch threads (default: the cores not already busy, by the load average; see docs/fitting.md)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fit", help="fit an adapter to paired activations (one-shot least squares)")
    p.add_argument("--x", required=True, help="model A hidden states [n, in_dim] (.npy, .npz, .safetensors)")
    p.add_argument("--z", required=True, help="targets for model B [n, out_dim], same row count as --x")
    p.add_argument("-o", "--output", required=True, help="adapter .safetensors to write (atomically)")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument(
        "--workers", type=number("workers"), help="workers per pipe, laid out by the tile planner (default 512)"
    )
    layout.add_argument(
        "--grid", type=number("grid"), nargs=2, metavar=("R", "C"), help="explicit grid: R row-blocks, C column-blocks"
    )
    p.add_argument(
        "--pipes", type=int, default=1, choices=(1, 3), help="number of pipes (3: the planner's 3-pipe layout)"
    )
    p.add_argument(
        "--mostly-padding",
        choices=("refuse", "adapt", "keep"),
        default="refuse",
        help="a pipe with more than half of its weights in the padding: refuse it before computing "
        "(default), adapt it (re-plan with the planner's covering tiles, and say so), or keep it",
    )
    p.add_argument("--top-k", type=number("top_k"), help="gate each pipe, selecting this many workers per token")
    p.add_argument(
        "--gate-scale",
        type=number("gate_scale"),
        help="gate_scale of gated pipes (default: top_k, so a uniform gate gives weight 1)",
    )
    p.add_argument("--ridge", type=number("ridge"), default=0.0, help="ridge lambda added to X^T X (default 0)")
    p.add_argument(
        "--holdout", type=number("holdout"), default=0.1, help="fraction of rows held out for the report (default 0.1)"
    )
    p.add_argument(
        "--method",
        choices=("joint", "per-tile"),
        default="joint",
        help="joint: exact least squares of the tiled map (default); per-tile: the seed's recipe, for comparison",
    )
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored dtype of the tensors")
    p.add_argument("--rounds", type=number("rounds"), default=3, help="gate/worker rounds for gated pipes (default 3)")
    p.add_argument(
        "--gate-steps",
        type=number("gate_steps"),
        default=300,
        help="Adam steps per round of gate training (default 300)",
    )
    p.add_argument(
        "--gate-lr",
        type=number("gate_lr"),
        default=1e-2,
        help="Adam step of gate training, relative to the gate weights' size (default 0.01)",
    )
    p.add_argument("--seed", type=number("seed"), default=0, help="seed of the held-out split and gate initialisation")
    p.add_argument("--chunk-rows", type=number("chunk_rows"), default=4096, help="rows read per chunk (default 4096)")
    add_threads_option(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    declare_outputs(p, files=("output",), folders=())
    p.set_defaults(func=run, needs=("torch",))


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from prism_deploy.cli.output import print_json
    from prism_deploy.core.fsutil import check_free_space
    from prism_deploy.fit import FitOptions, PairedData, fit_adapter, fit_layout
    from prism_deploy.fit.budget import check_budget
    from prism_deploy.fit.fitter import fit_estimate
    from prism_deploy.reference import save_adapter

    # Everything that can be refused is refused before the first pass over the data: the
    # output (by the CLI: prism_deploy.cli.paths), the inputs' shapes, the layout (padding),
    # the memory and disk it needs.
    data = PairedData(args.x, args.z, holdout=args.holdout, seed=args.seed, chunk_rows=args.chunk_rows)
    dtype = getattr(torch, args.dtype)
    layout = fit_layout(
        data.in_dim,
        data.out_dim,
        workers=args.workers,
        grid=tuple(args.grid) if args.grid else None,
        pipes=args.pipes,
        top_k=args.top_k,
        gate_scale=args.gate_scale,
        padding=args.mostly_padding,
        dtype_bytes=torch.finfo(dtype).bits // 8,
    )
    for note in layout.notes:
        print(f"note: {note}", file=sys.stderr)
    opts = FitOptions(
        method=args.method,
        ridge=args.ridge,
        rounds=args.rounds,
        gate_steps=args.gate_steps,
        gate_lr=args.gate_lr,
        seed=args.seed,
        dtype=dtype,
        threads=args.threads,
    )
    estimate = fit_estimate(layout.config, data, opts)
    check_budget(estimate, "this fit")
    check_free_space(args.output, estimate.adapter_bytes)
    adapter, report = fit_adapter(layout.config, data, opts)
    save_adapter(adapter, args.output)
    info = report.to_json()
    info["output"] = str(args.output)
    info["layout_notes"] = list(layout.notes)
    if args.json:
        print_json(info)
    else:
        print_report(info)
    return 0


def print_report(info: dict[str, Any]) -> None:
    from prism_deploy.cli.output import human_bytes, print_table

    print(f"wrote {info['output']} (method {info['method']}, ridge {info['ridge']:g})")
    rows = []
    for name in ("train", "holdout"):
        m = info[name]
        rows.append([name, m["rows"], m["rel_err"], m["cosine"]])
    if info.get("full_ls_holdout"):
        m = info["full_ls_holdout"]
        rows.append(["holdout, full-matrix LS", m["rows"], m["rel_err"], m["cosine"]])
    print_table(["split", "rows", "rel err", "cosine"], rows)
    print()
    print_table(
        ["#", "pipe", "grid", "tile", "top_k", "worst row-block", "its rel err"],
        [
            [
                p["index"],
                p["name"],
                "x".join(map(str, p["grid"])),
                "x".join(map(str, p["tile"])),
                p["top_k"] if p["top_k"] is not None else "all",
                p["worst_row_block"],
                p["worst_row_block_rel_err"],
            ]
            for p in info["pipes"]
        ],
    )
    if info["rounds"]:
        print()
        print_table(
            ["round", "held-out rel err", "kept"],
            [
                [r["round"], r.get("holdout_rel_err", r.get("train_rel_err")), r.get("kept", True)]
                for r in info["rounds"]
            ],
        )
    if info["solve"]:
        s = info["solve"]
        print(f"\nsolver: {s['method']}, rank {s['rank']} of {s['dim']}, condition estimate {s['cond_estimate']:.3g}")
    for note in info.get("layout_notes", []):
        print(f"layout: {note}")
    if info.get("estimate"):
        e = info["estimate"]
        print(
            f"threads: {info['threads']} ({info['threads_why']}); estimated peak memory {human_bytes(e['peak_bytes'])} "
            f"({e['peak_step']}), {e['chunk_rows']} rows per step"
        )
