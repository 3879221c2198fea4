"""``prism-deploy export ADAPTER -o OUT.onnx [--precision ...] [--io-dtype ...] [--calib FILE]``."""

from __future__ import annotations

import argparse

from prism_deploy.cli.output import human_bytes, print_json, print_table
from prism_deploy.cli.paths import declare_outputs
from prism_deploy.core import defaults
from prism_deploy.core.precision import CALIBRATORS, PRECISIONS, Precision


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="lower an adapter to an ONNX graph at a precision")
    add_arguments(p)
    declare_outputs(p, files=("output",), folders=())
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The export options; later options (e.g. the fusion pass's) are added beside them."""
    p.add_argument("adapter", help="adapter .safetensors file (format v1)")
    p.add_argument("-o", "--output", required=True, help="output .onnx file (weights over ~2 GiB go to OUT.onnx.data)")
    p.add_argument(
        "--precision",
        default=defaults.PRECISION.value,
        choices=PRECISIONS,
        help="fp32, fp16 (fp16 weights and compute), int8 (int8 weights, fp16 activations), "
        "int8-qdq (int8 weights and activations; needs --calib)",
    )
    p.add_argument("--io-dtype", default="float32", choices=("float32", "float16"), help="dtype of hidden and adapted")
    p.add_argument("--calib", metavar="FILE", help="calibration hidden states [n, in_dim] (.npy, .npz, .safetensors)")
    p.add_argument(
        "--calibrator",
        default=defaults.CALIBRATOR,
        choices=CALIBRATORS,
        help="activation range for int8-qdq: max |x| or the 99.99th percentile",
    )
    p.add_argument(
        "--plugin",
        action="store_true",
        help="fuse each gated pipe into one prism::tile_dispatch TensorRT plugin node "
        "(fp32, fp16, int8; not int8-qdq); ONNX Runtime runs it through prism_deploy.fuse.tile_dispatch_twin",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from prism_deploy.format import read_adapter_file
    from prism_deploy.lower import export_onnx

    adapter = read_adapter_file(args.adapter)
    # the CLI's edge: the name parsed once (choices= checked it); the lowering takes the Precision
    options = dict(
        precision=Precision(args.precision),
        io_dtype=args.io_dtype,
        calib=args.calib,
        calibrator=args.calibrator,
        progress=True,
    )
    if getattr(args, "plugin", False):
        from prism_deploy.fuse import export_fused

        result = export_fused(adapter, args.output, **options)
    else:
        result = export_onnx(adapter, args.output, **options)
    if args.json:
        print_json(result.to_json())
        return 0
    meta = result.metadata
    print(
        f"{args.output}: {result.precision}, io {result.io_dtype}, compute {meta['compute_dtype']}, "
        f"{result.node_count} nodes, {human_bytes(result.bytes)} in {len(result.paths)} file(s)"
    )
    rows = [
        [
            p["index"],
            p["name"],
            p["node_prefix"],
            "gated" if p["gated"] else "ungated",
            p["top_k"] if p["gated"] else "all",
            p["form"] or ("folded" if p["folded_into"] else "dense"),
        ]
        for p in meta["pipes"]
    ]
    print_table(["#", "pipe", "prefix", "kind", "top_k", "form"], rows)
    if meta.get("fused"):
        print(f"fused into prism::tile_dispatch: {', '.join(p['name'] for p in meta['fused'])}")
    return 0
