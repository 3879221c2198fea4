"""``prism-deploy build ADAPTER [-o DIR] [--target ...] [--precision ...] ...`` and
``prism-deploy build --model DIR [-o OUT] [--target ...] [--batch ...] [--seq ...] [--force] [--json]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prism_deploy.build.options import Profile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("build", help="build checked engines (TensorRT / ONNX Runtime) with a manifest")
    p.add_argument("adapter", nargs="?", help="adapter .safetensors file (format v1)")
    p.add_argument("--model", metavar="DIR",
                   help="instead of ADAPTER: a folder from `export-model`; one engine per graph")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="output folder (default engines/<adapter-stem>-<sha8>/; with --model engines/<role>-<sha8 of model.json>/)")
    p.add_argument("--target", default="auto", help="auto (default), trt, ort-cuda or ort-cpu")
    p.add_argument("--precision", metavar="LIST",
                   help="comma-separated: fp32, fp16, int8, int8-qdq (default fp16,int8 on GPU targets, fp32 on ort-cpu)")
    p.add_argument("--batch", default="1:4:32", metavar="MIN:OPT:MAX", help="batch range (default 1:4:32)")
    p.add_argument("--seq", default="1:64:1024", metavar="MIN:OPT:MAX", help="sequence range (default 1:64:1024)")
    p.add_argument("--per-pipe", action="store_true", help="one engine per pipe, combined by the loader")
    p.add_argument("--plugin", default="auto", help="fuse gated pipes into the tile_dispatch plugin: auto, on, off")
    p.add_argument("--calib", metavar="FILE", help="calibration hidden states for int8-qdq (.npy/.safetensors)")
    p.add_argument("--calibrator", default="max", help="int8-qdq activation calibrator: max or percentile")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check against the reference")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache has the engine")
    p.add_argument("--refittable", action="store_true", help="TensorRT: build refittable engines (weights updatable)")
    p.add_argument("--version-compatible", action="store_true",
                   help="TensorRT: engines the lean runtime of later versions can run")
    p.add_argument("--weight-streaming", action="store_true",
                   help="TensorRT: allow weights larger than GPU memory to stream at run time")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


# Adapter-only options, refused with --model (name, value when left at its default).
ADAPTER_OPTIONS = (("--precision", "precision", None), ("--per-pipe", "per_pipe", False), ("--plugin", "plugin", "auto"),
                   ("--calib", "calib", None), ("--calibrator", "calibrator", "max"), ("--refittable", "refittable", False),
                   ("--version-compatible", "version_compatible", False), ("--weight-streaming", "weight_streaming", False))


def run(args: argparse.Namespace) -> int:
    from prism_deploy.build import BuildRequest, Profile, build_engines
    from prism_deploy.build.options import parse_precisions, parse_range
    from prism_deploy.cli.output import human_bytes, print_json, print_table
    from prism_deploy.errors import PrismInputError

    if args.model is not None and args.adapter is not None:
        raise PrismInputError("build: give ADAPTER or --model DIR, not both")
    if args.model is None and args.adapter is None:
        raise PrismInputError("build: give ADAPTER (an adapter .safetensors) or --model DIR (an export-model folder)")
    profile = Profile(parse_range(args.batch, "--batch"), parse_range(args.seq, "--seq"))
    if args.model is not None:
        for option, attr, default in ADAPTER_OPTIONS:
            if getattr(args, attr) != default:
                raise PrismInputError(f"{option}: an adapter build option, not valid with --model")
        return run_model(args, profile)
    request = BuildRequest(
        adapter=Path(args.adapter),
        out_dir=Path(args.output) if args.output else None,
        target=args.target,
        precisions=parse_precisions(args.precision) if args.precision is not None else None,
        profile=profile,
        per_pipe=args.per_pipe,
        plugin=args.plugin,
        calib=Path(args.calib) if args.calib else None,
        calibrator=args.calibrator,
        parity=not args.no_parity,
        force=args.force,
        refittable=args.refittable,
        version_compatible=args.version_compatible,
        weight_streaming=args.weight_streaming,
        progress=not args.json and sys.stderr.isatty(),
    )
    result = build_engines(request)
    if args.json:
        print_json({
            "directory": str(result.directory),
            "target": result.target,
            "target_reason": result.target_reason,
            "notes": result.notes,
            "manifest_written": result.manifest_written,
            "engines": [{"id": o.config.id, "action": o.action, "detail": o.detail, "seconds": round(o.seconds, 3),
                         "entry": o.entry} for o in result.outcomes],
        })
    else:
        print(f"target: {result.target}: {result.target_reason}")
        for note in result.notes:
            print(f"note: {note}")
        rows = []
        for o in result.outcomes:
            e = o.entry or {}
            par = e.get("parity") or {}
            rows.append([o.config.id, f"{o.action} ({o.detail})" if o.action != "failed" else "failed",
                         len(e.get("parts", [])) or "-", human_bytes(sum(p["bytes"] + p.get("data_bytes", 0) for p in e["parts"])) if e else "-",
                         round(o.seconds, 3), par.get("max_abs"), par.get("rel_l2"), par.get("cosine"),
                         "-" if not par else ("pass" if par.get("passed", True) else "FAIL")])
        print_table(["engine", "action", "files", "size", "build s", "max_abs", "rel_l2", "cosine", "parity"], rows)
        print(f"manifest: {result.directory / 'manifest.json'}"
              + ("" if result.manifest_written else " (unchanged)"))
    result.raise_for_failures()
    return 0


def run_model(args: argparse.Namespace, profile: Profile) -> int:
    """``build --model DIR``: one engine per graph of an export-model folder (prism_deploy.build.model_builder)."""
    from prism_deploy.build.model_builder import ModelBuildRequest, build_model_engines
    from prism_deploy.cli.output import human_bytes, print_json, print_table

    result = build_model_engines(ModelBuildRequest(
        model_dir=Path(args.model), out_dir=Path(args.output) if args.output else None, target=args.target,
        profile=profile, parity=not args.no_parity, force=args.force, progress=not args.json and sys.stderr.isatty()))
    if args.json:
        print_json({"directory": str(result.directory), "role": result.role, "target": result.target,
                    "target_reason": result.target_reason, "manifest_written": result.manifest_written,
                    "engines": [{"id": o.id, "graph": o.graph, "action": o.action, "detail": o.detail,
                                 "seconds": round(o.seconds, 3), "entry": o.entry} for o in result.outcomes]})
    else:
        print(f"target: {result.target}: {result.target_reason}")
        rows = []
        for o in result.outcomes:
            e = o.entry or {}
            par = e.get("parity") or {}
            rows.append([o.id, f"{o.action} ({o.detail})" if o.action != "failed" else "failed",
                         human_bytes(sum(p["bytes"] + p.get("data_bytes", 0) for p in e["parts"])) if e else "-",
                         round(o.seconds, 3), par.get("rel_l2"), par.get("max_abs"),
                         "-" if not par else ("skipped" if par.get("skipped") else "pass")])
        print_table(["engine", "action", "size", "build s", "rel_l2", "max_abs", "parity"], rows)
        print(f"manifest: {result.directory / 'manifest.json'}" + ("" if result.manifest_written else " (unchanged)"))
    result.raise_for_failures()
    return 0
