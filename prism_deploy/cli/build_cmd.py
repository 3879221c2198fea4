"""``prism-deploy build ADAPTER [-o DIR] [--target ...] [--precision ...] ...``,
``prism-deploy build --model DIR [-o OUT] [--target ...] [--batch ...] [--seq ...] [--force] [--json]`` and
``prism-deploy build --chain FILE [-o OUT] [...]`` (every stage, and OUT/chain.json) and
``prism-deploy build --graph FILE [-o OUT] [...]`` (every stage once, and OUT/graph.json)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prism_deploy.cli.paths import declare_outputs
from prism_deploy.core import defaults
from prism_deploy.core.precision import CALIBRATORS, PRECISIONS
from prism_deploy.core.targets import TARGET_CHOICES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("build", help="build checked engines (TensorRT / ONNX Runtime) with a manifest")
    p.add_argument("adapter", nargs="?", help="adapter .safetensors file (format v1)")
    p.add_argument(
        "--model", metavar="DIR", help="instead of ADAPTER: a folder from `export-model`; one engine per graph"
    )
    p.add_argument(
        "--chain",
        metavar="FILE",
        help="instead of ADAPTER: a chain file; builds every stage into OUT/<n>-<name>/ and writes "
        "OUT/chain.json (run --chain OUT runs it)",
    )
    p.add_argument(
        "--graph",
        metavar="FILE",
        help="instead of ADAPTER: a graph file; builds every stage once (a source stages share is built "
        "once) into OUT/<n>-<name>/ and writes OUT/graph.json (run --graph OUT runs it)",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="output folder (default engines/<adapter-stem>-<sha8>/; with --model engines/<role>-<sha8 of model.json>/)",
    )
    p.add_argument("--target", default="auto", help=f"{', '.join(TARGET_CHOICES)} (default auto)")
    p.add_argument(
        "--precision",
        metavar="LIST",
        help=f"comma-separated: {', '.join(PRECISIONS)} (default fp16,int8 on GPU targets, fp32 on ort-cpu)",
    )
    batch, seq = defaults.range_text(defaults.BATCH_RANGE), defaults.range_text(defaults.SEQ_RANGE)
    p.add_argument("--batch", default=batch, metavar="MIN:OPT:MAX", help=f"batch range (default {batch})")
    p.add_argument("--seq", default=seq, metavar="MIN:OPT:MAX", help=f"sequence range (default {seq})")
    p.add_argument("--per-pipe", action="store_true", help="one engine per pipe, combined by the loader")
    p.add_argument("--plugin", default="auto", help="fuse gated pipes into the tile_dispatch plugin: auto, on, off")
    p.add_argument("--calib", metavar="FILE", help="calibration hidden states for int8-qdq (.npy/.safetensors)")
    p.add_argument(
        "--calibrator", default=defaults.CALIBRATOR, help=f"int8-qdq activation calibrator: {' or '.join(CALIBRATORS)}"
    )
    p.add_argument(
        "--forms",
        default="timed",
        metavar="MODE",
        help="gated pipes on ONNX Runtime: 'timed' builds every gated form (A, B, sparse, grouped) and keeps the "
        "fastest per token bucket, measured here; 'auto' builds one graph by the lowering's rule "
        "(default timed)",
    )
    p.add_argument("--no-parity", action="store_true", help="skip the parity check against the reference")
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild even when the cache has the engine; build into a folder that holds other engines "
        "or files (another source's engines are replaced; files prism-deploy did not write are kept)",
    )
    p.add_argument("--refittable", action="store_true", help="TensorRT: build refittable engines (weights updatable)")
    p.add_argument(
        "--version-compatible", action="store_true", help="TensorRT: engines the lean runtime of later versions can run"
    )
    p.add_argument(
        "--weight-streaming",
        action="store_true",
        help="TensorRT: allow weights larger than GPU memory to stream at run time",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    declare_outputs(p, files=(), folders=("output",))
    p.set_defaults(func=run)


# Adapter-only options, refused with --model (name, value when left at its default).
ADAPTER_OPTIONS = (
    ("--precision", "precision", None),
    ("--per-pipe", "per_pipe", False),
    ("--plugin", "plugin", "auto"),
    ("--calib", "calib", None),
    ("--calibrator", "calibrator", defaults.CALIBRATOR),
    ("--refittable", "refittable", False),
    ("--version-compatible", "version_compatible", False),
    ("--weight-streaming", "weight_streaming", False),
    ("--forms", "forms", "timed"),
)


def run(args: argparse.Namespace) -> int:
    from prism_deploy.builder import BuildRequest, ModelBuildRequest, Profile, build_engines, build_model_engines
    from prism_deploy.builder.options import parse_range
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.core.precision import parse_precision_list

    sources = [
        name
        for name, value in (
            ("ADAPTER", args.adapter),
            ("--model", args.model),
            ("--chain", args.chain),
            ("--graph", args.graph),
        )
        if value is not None
    ]
    if len(sources) > 1:
        raise PrismInputError(
            f"build: give one of ADAPTER, --model DIR, --chain FILE, --graph FILE, not both {' and '.join(sources)}"
        )
    if not sources:
        raise PrismInputError(
            "build: give ADAPTER (an adapter .safetensors), --model DIR (an export-model folder) or --chain FILE"
        )
    profile = Profile(parse_range(args.batch, "--batch"), parse_range(args.seq, "--seq"))
    out_dir = Path(args.output) if args.output else None
    progress = not args.json and sys.stderr.isatty()
    if args.chain is not None or args.graph is not None:
        flag = "--chain" if args.chain is not None else "--graph"
        for option, attr, default in ADAPTER_OPTIONS:
            if getattr(args, attr) != default:
                raise PrismInputError(f"{option}: not valid with {flag} (the file sets each stage's precision)")
        return run_chain(args, profile, out_dir, progress)
    if args.model is not None:
        for option, attr, default in ADAPTER_OPTIONS:
            if getattr(args, attr) != default:
                raise PrismInputError(f"{option}: an adapter build option, not valid with --model")
        check = None
        if not args.no_parity:
            from prism_deploy.parity.build_checks import model_graph_check

            check = model_graph_check(args.model)
        result = build_model_engines(
            ModelBuildRequest(
                model_dir=Path(args.model),
                out_dir=out_dir,
                target=args.target,
                profile=profile,
                force=args.force,
                progress=progress,
            ),
            check,
        )
    else:
        request = BuildRequest(
            adapter=Path(args.adapter),
            out_dir=out_dir,
            target=args.target,
            precisions=parse_precision_list(args.precision) if args.precision is not None else None,
            profile=profile,
            per_pipe=args.per_pipe,
            plugin=args.plugin,
            calib=Path(args.calib) if args.calib else None,
            calibrator=args.calibrator,
            force=args.force,
            refittable=args.refittable,
            version_compatible=args.version_compatible,
            weight_streaming=args.weight_streaming,
            progress=progress,
            forms=args.forms,
        )
        check = None
        if not args.no_parity:
            from prism_deploy.parity.build_checks import adapter_engine_check

            check = adapter_engine_check(request.adapter)
        result = build_engines(request, check)
    print_result(result, args.json)
    result.raise_for_failures()
    return 0


def run_chain(args: argparse.Namespace, profile: Any, out_dir: Path | None, progress: bool) -> int:
    from prism_deploy.builder.chain_source import ChainBuildRequest, build_chain, summary
    from prism_deploy.cli.output import print_json
    from prism_deploy.core.fsutil import file_sha256
    from prism_deploy.format.chain_file import read_chain_file

    source = args.chain if args.chain is not None else args.graph
    kind = "chain" if args.chain is not None else "graph"
    if out_dir is None:
        out_dir = Path("engines") / f"{kind}-{Path(source).stem}-{file_sha256(source)[:8]}"
    adapter_check = model_check = None
    if not args.no_parity:
        from prism_deploy.parity.build_checks import adapter_engine_check, model_graph_check

        adapter_check, model_check = adapter_engine_check, model_graph_check
    target = None if args.target == "auto" else args.target
    if args.graph is not None:
        from prism_deploy.builder.graph_source import GraphBuildRequest, build_graph
        from prism_deploy.format.graph_file import read_graph_file

        result = build_graph(
            GraphBuildRequest(read_graph_file(args.graph), out_dir, target, profile, args.force, progress),
            adapter_check,
            model_check,
        )
    else:
        result = build_chain(
            ChainBuildRequest(read_chain_file(args.chain), out_dir, target, profile, args.force, progress),
            adapter_check,
            model_check,
        )
    if args.json:
        print_json(
            {
                "directory": str(result.directory),
                f"{kind}_file": str(result.chain_file) if result.chain_file else None,
                "stages": summary(result),
            }
        )
    else:
        for label, stage in result.stages:
            print(f"== {label}")
            if stage is None:
                print("already a build folder: used as it is")
            else:
                print_result(stage, False)
        print(f"{kind}: {result.chain_file}" if result.chain_file else f"{kind}: not written (a stage failed)")
    result.raise_for_failures()
    return 0


def parity_cell(parity: dict | None) -> str:
    """The table's parity column: what the check found, and never "pass" without a check."""
    if not parity:
        return "-"
    if parity.get("passed") is None:
        return "not checked"
    return "pass" if parity["passed"] else "FAIL"


def print_result(result: Any, as_json: bool) -> None:
    from prism_deploy.cli.output import human_bytes, print_json, print_table

    if as_json:
        head = {
            "directory": str(result.directory),
            "target": result.target,
            "target_reason": result.target_reason,
            "notes": result.notes,
            "manifest_written": result.manifest_written,
        }
        if result.kind == "model":
            head["role"] = result.label
        print_json(
            {
                **head,
                "engines": [
                    {
                        "id": o.id,
                        "action": o.action,
                        "detail": o.detail,
                        "seconds": round(o.seconds, 3),
                        "entry": o.entry,
                    }
                    for o in result.outcomes
                ],
            }
        )
        return
    print(f"target: {result.target}: {result.target_reason}")
    for note in result.notes:
        print(f"note: {note}")
    rows = []
    for o in result.outcomes:
        e = o.entry or {}
        par = e.get("parity") or {}
        size = human_bytes(sum(p["bytes"] + (p.get("data_bytes") or 0) for p in e["parts"])) if e else "-"
        action = f"{o.action} ({o.detail})" if o.action != "failed" else "failed"
        if result.kind == "model":
            rows.append(
                [o.id, action, size, round(o.seconds, 3), par.get("max_abs"), par.get("rel_l2"), parity_cell(par)]
            )
        else:
            rows.append(
                [
                    o.id,
                    action,
                    len(e.get("parts", [])) or "-",
                    size,
                    round(o.seconds, 3),
                    par.get("max_abs"),
                    par.get("rel_l2"),
                    par.get("cosine"),
                    parity_cell(par),
                ]
            )
    if result.kind == "model":
        print_table(["engine", "action", "size", "build s", "max_abs", "rel_l2", "parity"], rows)
    else:
        print_table(["engine", "action", "files", "size", "build s", "max_abs", "rel_l2", "cosine", "parity"], rows)
    print(f"manifest: {result.directory / 'manifest.json'}" + ("" if result.manifest_written else " (unchanged)"))
