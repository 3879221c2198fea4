"""``prism-deploy convert tiles.pt --in-dim D --out-dim E [--grid R C] [--name NAME] -o OUT``."""

from __future__ import annotations

import argparse
import sys

from prism_deploy.cli.numbers import WIDTH, number
from prism_deploy.cli.paths import declare_outputs
from prism_deploy.core.limits import Limit
from prism_deploy.plan import MAX_WORKERS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="turn the seed's torch.save'd [workers, tr, tc] tiles into a v1 adapter")
    p.add_argument("tiles", help="a .pt file holding one tensor [workers, tile_rows, tile_cols]")
    p.add_argument("--in-dim", type=number(WIDTH), required=True, help="input width the tiles were trained for")
    p.add_argument("--out-dim", type=number(WIDTH), required=True, help="output width the tiles were trained for")
    p.add_argument(
        "--grid",
        type=number(Limit(int, 1, MAX_WORKERS)),
        nargs=2,
        metavar=("R", "C"),
        help="row-blocks x column-blocks (default: the one grid whose tiles cover the dims)",
    )
    p.add_argument("--name", default="pipe1", help="the pipe's name (default pipe1)")
    p.add_argument("-o", "--output", required=True, help="adapter .safetensors to write")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the line")
    declare_outputs(p, files=("output",), folders=())
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prism_deploy.format.convert import convert_seed_tiles

    data = convert_seed_tiles(
        args.tiles,
        args.output,
        args.in_dim,
        args.out_dim,
        tuple(args.grid) if args.grid else None,
        args.name,
    )
    spec = data.config.pipes[0]
    padding = len(spec.padding_workers(data.config.in_dim, data.config.out_dim))
    dtype = str(data.tensors["pipes.0.tiles"].dtype).removeprefix("torch.")
    if args.json:
        from prism_deploy.cli.output import print_json

        print_json(
            {
                "output": args.output,
                "in_dim": data.config.in_dim,
                "out_dim": data.config.out_dim,
                "pipe": spec.name,
                "grid": list(spec.grid),
                "tile": list(spec.tile),
                "gated": False,
                "dtype": dtype,
                "padding_workers": padding,
            }
        )
        return 0
    print(
        f"wrote {args.output}: {data.config.in_dim} -> {data.config.out_dim}, pipe {spec.name!r} "
        f"grid {spec.grid[0]}x{spec.grid[1]} of {spec.tile[0]}x{spec.tile[1]} tiles, ungated, {dtype}"
    )
    if padding:
        print(f"note: {padding} worker(s) lie wholly in the padding", file=sys.stderr)
    return 0
