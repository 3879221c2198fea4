"""``prism-deploy inspect ADAPTER [--json]``."""

from __future__ import annotations

import argparse
import json

from prism_deploy.cli.output import human_bytes, print_json, print_table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="show an adapter file's layout, sizes and costs")
    p.add_argument("adapter", help="adapter .safetensors file (format v1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prism_deploy.format import read_adapter_file

    info = read_adapter_file(args.adapter).describe()
    if args.json:
        print_json(info)
        return 0
    print(f"{args.adapter}: prism-adapter v{info['format_version']}, "
          f"{info['in_dim']} -> {info['out_dim']}, {len(info['pipes'])} pipe(s), combine={info['combine']}")
    if info["combine_weights"] is not None:
        print(f"combine weights: {', '.join(f'{w:.4g}' for w in info['combine_weights'])}")
    rows = [
        [p["index"], p["name"], "x".join(map(str, p["grid"])), "x".join(map(str, p["tile"])), p["workers"],
         p["top_k"] if p["top_k"] is not None else "all", p["gate_scale"], p["dtype"], human_bytes(p["bytes"]),
         p["padding_workers"]]
        for p in info["pipes"]
    ]
    print_table(["#", "pipe", "grid", "tile", "workers", "top_k", "gate_scale", "dtype", "bytes", "pad-only"], rows)
    f, b = info["flops_per_token"], info["weight_bytes_per_token"]
    print(f"params: {info['params']:,}  ({human_bytes(info['bytes'])})")
    print(f"per token: {f['dense']:,} FLOPs dense, {f['gated']:,} gated; "
          f"weights read {human_bytes(b['dense'])} dense, {human_bytes(b['gated'])} gated")
    pad = sum(p["padding_workers"] for p in info["pipes"])
    if pad:
        print(f"note: {pad} worker(s) lie wholly in the padding (they compute nothing useful)")
    for key in ("source", "target"):
        if info[key] is not None:
            print(f"{key}: {json.dumps(info[key], sort_keys=True)}")
    return 0
