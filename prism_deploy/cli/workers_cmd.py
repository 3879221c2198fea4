"""``prism-deploy workers ADAPTER --x X --z Z``: rank workers by their share of the held-out error."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from prism_deploy.cli.fit_cmd import add_threads_option, number

if TYPE_CHECKING:
    from prism_deploy.fit import PairedData
    from prism_deploy.reference import PrismAdapter


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("workers", help="rank an adapter's workers by their share of the held-out error")
    p.add_argument("adapter", help="adapter .safetensors file (format v1)")
    p.add_argument("--x", required=True, help="model A hidden states [n, in_dim]")
    p.add_argument("--z", required=True, help="targets [n, out_dim], same row count as --x")
    p.add_argument(
        "--ridge",
        type=number("ridge"),
        default=0.0,
        help="ridge of the joint re-solve that defines each worker's share (default 0)",
    )
    p.add_argument("--top", type=number("top"), default=20, help="show the N worst workers (default 20; 0: all)")
    p.add_argument(
        "--holdout",
        type=number("holdout"),
        default=0.1,
        help="held-out fraction, as given to fit (default 0.1); 1 scores on every row of a separate file",
    )
    p.add_argument("--seed", type=number("seed"), default=0, help="seed of the held-out split, as given to fit")
    p.add_argument("--chunk-rows", type=number("chunk_rows"), default=4096, help="rows read per chunk (default 4096)")
    add_threads_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run, needs=("torch",))


def run(args: argparse.Namespace) -> int:
    from prism_deploy.cli.output import print_json, print_table
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.fit import PairedData
    from prism_deploy.fit.budget import forward_macs, pass_work, step_rows
    from prism_deploy.fit.evaluate import evaluate
    from prism_deploy.fit.localize import score_work, score_workers
    from prism_deploy.fit.progress import overall_progress
    from prism_deploy.fit.threads import choose_threads, torch_threads
    from prism_deploy.reference import load_adapter

    # workers writes no file: nothing to check before computing but its inputs.
    adapter = load_adapter(args.adapter)
    data = PairedData(args.x, args.z, holdout=args.holdout, seed=args.seed, chunk_rows=args.chunk_rows)
    data = data.with_chunk_rows(step_rows(adapter.config, data.chunk_rows))
    _check_dims(adapter, data)
    if data.count("holdout") == 0:
        raise PrismInputError(f"no held-out rows (--holdout {args.holdout} of {data.rows} rows); raise --holdout")
    total = score_work(adapter.config, data) + data.count("holdout") * pass_work(
        forward_macs(adapter.config), data.chunk_rows
    )
    threads, _ = choose_threads(args.threads)
    with torch_threads(threads), overall_progress(total, "workers"):
        scores = score_workers(adapter, data, ridge=args.ridge)
        overall = evaluate(adapter, data, "holdout")
    shown = scores if args.top == 0 else scores[: args.top]
    if args.json:
        print_json({"adapter": args.adapter, "holdout": overall.to_json(), "workers": [s.to_json() for s in shown]})
        return 0
    print(f"{args.adapter}: held-out rel err {overall.rel_err:.4g} over {overall.rows} rows")
    print("deviation: held-out squared output of (tile - its share of the joint solution); excess: held-out")
    print("squared error that re-solving the worker alone would remove; both relative to the held-out squared error")
    print_table(
        ["rank", "pipe", "worker", "row-block", "col-block", "deviation", "excess", "row-block rel err"],
        [
            [i + 1, s.pipe, s.worker, s.row_block, s.col_block, s.deviation, s.excess, s.row_block_rel_err]
            for i, s in enumerate(shown)
        ],
    )
    return 0


def _check_dims(adapter: PrismAdapter, data: PairedData) -> None:
    from prism_deploy.core.errors import PrismInputError

    if (adapter.in_dim, adapter.out_dim) != (data.in_dim, data.out_dim):
        raise PrismInputError(
            f"adapter maps {adapter.in_dim} -> {adapter.out_dim} but --x has {data.in_dim} columns and --z {data.out_dim}"
        )
