"""``prism-deploy inspect ADAPTER [--json]``."""

from __future__ import annotations

import argparse
import json

from prism_deploy.cli.output import human_bytes, print_json, print_table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show an adapter file's layout, sizes and costs, or an engine folder's gated form per token bucket",
    )
    p.add_argument("adapter", help="adapter .safetensors file (format v1), or a `prism-deploy build` folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def forms_rows(entry: dict) -> list[list]:
    """One row per token bucket of a manifest entry: its range, each candidate's time, the choice."""
    forms = entry.get("forms") or {}
    rows, low = [], 1
    for b in forms.get("buckets", []):
        times = [
            f"{b['seconds'][f] * 1e3:.3f}"
            if b["seconds"].get(f) is not None
            else ("fails" if not b["passed"].get(f, True) else "-")
            for f in forms["candidates"]
        ]
        rows.append([f"{low}-{b['max_tokens']}", b["timed_tokens"], *times, b["form"]])
        low = b["max_tokens"] + 1
    return rows


def run_engines(args: argparse.Namespace) -> int:
    from pathlib import Path

    from prism_deploy.format.engine_manifest import read_manifest

    manifest = read_manifest(Path(args.adapter))
    if manifest is None:
        from prism_deploy.core.errors import PrismInputError
        from prism_deploy.format.model_folder import not_an_adapter

        reason = not_an_adapter(args.adapter)  # an export-model folder: the one a user most often tries next
        if reason is not None:
            raise PrismInputError(f"{args.adapter}: {reason}")
        raise PrismInputError(f"{args.adapter}: a folder without manifest.json (not a `prism-deploy build` folder)")
    if args.json:
        print_json({"engines": [{"id": e["id"], "forms": e.get("forms")} for e in manifest["engines"]]})
        return 0
    for entry in manifest["engines"]:
        forms = entry.get("forms")
        if not forms:
            print(f"{entry['id']}: one graph ({len(entry['parts'])} part(s))")
            continue
        print(
            f"{entry['id']}: gated form per token bucket (ms per call, measured at build; "
            f"baseline {forms.get('baseline')})"
        )
        print_table(["tokens", "timed at", *(f"{f} ms" for f in forms["candidates"]), "chosen"], forms_rows(entry))
    return 0


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from prism_deploy.format import read_adapter_file

    if Path(args.adapter).is_dir():
        return run_engines(args)

    info = read_adapter_file(args.adapter).describe()
    if args.json:
        print_json(info)
        return 0
    print(
        f"{args.adapter}: prism-adapter v{info['format_version']}, "
        f"{info['in_dim']} -> {info['out_dim']}, {len(info['pipes'])} pipe(s), combine={info['combine']}"
    )
    if info["combine_weights"] is not None:
        print(f"combine weights: {', '.join(f'{w:.4g}' for w in info['combine_weights'])}")
    rows = [
        [
            p["index"],
            p["name"],
            "x".join(map(str, p["grid"])),
            "x".join(map(str, p["tile"])),
            p["workers"],
            p["top_k"] if p["top_k"] is not None else "all",
            p["gate_scale"],
            p["dtype"],
            human_bytes(p["bytes"]),
            p["padding_workers"],
        ]
        for p in info["pipes"]
    ]
    print_table(["#", "pipe", "grid", "tile", "workers", "top_k", "gate_scale", "dtype", "bytes", "pad-only"], rows)
    f, b = info["flops_per_token"], info["weight_bytes_per_token"]
    print(f"params: {info['params']:,}  ({human_bytes(info['bytes'])})")
    print(
        f"per token: {f['dense']:,} FLOPs dense, {f['gated']:,} gated; "
        f"weights read {human_bytes(b['dense'])} dense, {human_bytes(b['gated'])} gated"
    )
    pad = sum(p["padding_workers"] for p in info["pipes"])
    if pad:
        print(f"note: {pad} worker(s) lie wholly in the padding (they compute nothing useful)")
    for key in ("source", "target"):
        if info[key] is not None:
            print(f"{key}: {json.dumps(info[key], sort_keys=True)}")
    return 0
