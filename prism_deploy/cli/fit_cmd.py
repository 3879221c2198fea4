"""``prism-deploy fit --x X --z Z -o adapter.safetensors``: train an adapter by least squares."""

from __future__ import annotations

import argparse
from typing import Any
from prism_deploy.cli.paths import declare_outputs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fit", help="fit an adapter to paired activations (one-shot least squares)")
    p.add_argument("--x", required=True, help="model A hidden states [n, in_dim] (.npy, .npz, .safetensors)")
    p.add_argument("--z", required=True, help="targets for model B [n, out_dim], same row count as --x")
    p.add_argument("-o", "--output", required=True, help="adapter .safetensors to write (atomically)")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--workers", type=int, help="workers per pipe, laid out by the tile planner (default 512)")
    layout.add_argument("--grid", type=int, nargs=2, metavar=("R", "C"), help="explicit grid: R row-blocks, C column-blocks")
    p.add_argument("--pipes", type=int, default=1, choices=(1, 3), help="number of pipes (3: the planner's 3-pipe layout)")
    p.add_argument("--top-k", type=int, help="gate each pipe, selecting this many workers per token")
    p.add_argument("--gate-scale", type=float, help="gate_scale of gated pipes (default: top_k, so a uniform gate gives weight 1)")
    p.add_argument("--ridge", type=float, default=0.0, help="ridge lambda added to X^T X (default 0)")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of rows held out for the report (default 0.1)")
    p.add_argument("--method", choices=("joint", "per-tile"), default="joint",
                   help="joint: exact least squares of the tiled map (default); per-tile: the seed's recipe, for comparison")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored dtype of the tensors")
    p.add_argument("--rounds", type=int, default=3, help="gate/worker rounds for gated pipes (default 3)")
    p.add_argument("--gate-steps", type=int, default=300, help="Adam steps per round of gate training (default 300)")
    p.add_argument("--gate-lr", type=float, default=1e-2, help="Adam step of gate training, relative to the gate weights' size (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and gate initialisation")
    p.add_argument("--chunk-rows", type=int, default=4096, help="rows read per chunk (default 4096)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    declare_outputs(p, files=("output",), folders=())
    p.set_defaults(func=run, needs=("torch",))


def run(args: argparse.Namespace) -> int:
    import torch

    from prism_deploy.cli.output import print_json
    from prism_deploy.fit import FitOptions, PairedData, fit_adapter, fit_config
    from prism_deploy.reference import save_adapter

    data = PairedData(args.x, args.z, holdout=args.holdout, seed=args.seed, chunk_rows=args.chunk_rows)
    config = fit_config(data.in_dim, data.out_dim, workers=args.workers,
                        grid=tuple(args.grid) if args.grid else None, pipes=args.pipes,
                        top_k=args.top_k, gate_scale=args.gate_scale)
    opts = FitOptions(method=args.method, ridge=args.ridge, rounds=args.rounds, gate_steps=args.gate_steps, gate_lr=args.gate_lr,
                      seed=args.seed, dtype=getattr(torch, args.dtype))
    adapter, report = fit_adapter(config, data, opts)
    save_adapter(adapter, args.output)
    info = report.to_json()
    info["output"] = str(args.output)
    if args.json:
        print_json(info)
    else:
        print_report(info)
    return 0


def print_report(info: dict[str, Any]) -> None:
    from prism_deploy.cli.output import print_table

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
    print_table(["#", "pipe", "grid", "tile", "top_k", "worst row-block", "its rel err"],
                [[p["index"], p["name"], "x".join(map(str, p["grid"])), "x".join(map(str, p["tile"])),
                  p["top_k"] if p["top_k"] is not None else "all", p["worst_row_block"], p["worst_row_block_rel_err"]]
                 for p in info["pipes"]])
    if info["rounds"]:
        print()
        print_table(["round", "held-out rel err", "kept"],
                    [[r["round"], r.get("holdout_rel_err", r.get("train_rel_err")), r.get("kept", True)]
                     for r in info["rounds"]])
    if info["solve"]:
        s = info["solve"]
        print(f"\nsolver: {s['method']}, rank {s['rank']} of {s['dim']}, condition estimate {s['cond_estimate']:.3g}")
