"""``prism-deploy plan IN OUT [--workers N] [--three-pipe] [--json]``."""

from __future__ import annotations

import argparse

from prism_deploy.cli.numbers import WIDTH, number
from prism_deploy.cli.output import print_json, print_table
from prism_deploy.core.limits import Limit
from prism_deploy.plan import MAX_WORKERS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="plan the tile grid for an IN -> OUT adapter (docs/planner.md)")
    p.add_argument("in_dim", type=number(WIDTH, "IN"), metavar="IN", help="input width (model A's hidden state)")
    p.add_argument("out_dim", type=number(WIDTH, "OUT"), metavar="OUT", help="output width (model B's input embedding)")
    p.add_argument(
        "--workers",
        type=number(Limit(int, 1, MAX_WORKERS)),
        default=512,
        metavar="N",
        help="number of workers (default 512)",
    )
    p.add_argument(
        "--three-pipe",
        action="store_true",
        help="the seed's three pipes: two of 512x512 tiles, one of power-of-two N x K tiles",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prism_deploy.plan import plan_three_pipes, plan_tiles

    if args.three_pipe:
        three = plan_three_pipes(args.in_dim, args.out_dim, args.workers)
        plans = [(f"pipe{i + 1}", p) for i, p in enumerate(three.pipes)]
        obj = three.to_json()
    else:
        single = plan_tiles(args.in_dim, args.out_dim, args.workers)
        plans = [("pipe1", single)]
        obj = single.to_json()
    if args.json:
        print_json(obj)
        return 0
    print(
        f"{args.in_dim} -> {args.out_dim}, {args.workers} workers requested "
        f"(aspect out/in = {args.out_dim / args.in_dim:.4g})"
    )
    rows = [
        [
            name,
            f"{p.grid[0]}x{p.grid[1]}",
            f"{p.tile[0]}x{p.tile[1]}",
            p.workers,
            f"{p.padded_out}x{p.padded_in}",
            p.padding_rows,
            p.padding_cols,
            p.padding_workers,
        ]
        for name, p in plans
    ]
    print_table(["pipe", "grid", "tile", "workers", "padded out x in", "pad rows", "pad cols", "pad-only"], rows)
    for name, p in plans:
        for note in p.notes:
            if len(plans) > 1 and name == "pipe2" and p is plans[0][1]:
                continue  # pipe 2 is pipe 1's twin: its notes were printed once already
            print(f"note ({name}): {note}")
    return 0
