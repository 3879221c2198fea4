"""``prism-deploy fuse IN.onnx -o OUT.onnx [--json]``: the plugin fusion pass on an exported model.

Each gated pipe's masked subgraph becomes one ``prism::tile_dispatch`` node (a TensorRT plugin;
the ONNX Runtime twin in ``prism_deploy.fuse.tile_dispatch_twin`` runs it on CPU). ``export --plugin`` is
the same pass applied right after lowering.
"""

from __future__ import annotations

import argparse

from prism_deploy.cli.output import print_json, print_table
from prism_deploy.cli.paths import declare_outputs


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    p = subparsers.add_parser(
        "fuse", help="replace each gated pipe of an exported ONNX model by one tile_dispatch plugin node"
    )
    p.add_argument("model", help="ONNX model written by prism-deploy export")
    p.add_argument("-o", "--output", required=True, help="fused ONNX model to write")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    declare_outputs(p, files=("output",), folders=())
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prism_deploy.fuse import fuse_onnx_file

    result = fuse_onnx_file(args.model, args.output)
    if args.json:
        print_json(result)
        return 0
    print(
        f"{args.output}: {result['nodes_before']} -> {result['nodes_after']} nodes, "
        f"{len(result['fused_pipes'])} gated pipe(s) fused"
    )
    rows = [
        [
            p["index"],
            p["name"],
            p["node"],
            p["tile_dtype"],
            "x".join(str(p["attributes"][k]) for k in ("R", "C")),
            "x".join(str(p["attributes"][k]) for k in ("tr", "tc")),
            p["attributes"]["top_k"],
        ]
        for p in result["fused_pipes"]
    ]
    if rows:
        print_table(["#", "pipe", "node", "tiles", "grid", "tile", "top_k"], rows)
    return 0
