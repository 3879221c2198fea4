"""``prism-deploy triton update REPO --adapter NEW.safetensors [--allow-shape-change]``: hot-swap an adapter."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "triton-update",
        help="build a retrained adapter (parity gate), write it as the next version, hot-swap it",
        description="Also spelled `prism-deploy triton update`.",
    )
    p.add_argument("repository", metavar="REPO", help="a repository written by `prism-deploy triton`")
    p.add_argument("--adapter", required=True, metavar="FILE", help="the new adapter .safetensors")
    p.add_argument("--model", help="the adapter model to update when the repository has several")
    p.add_argument(
        "--allow-shape-change",
        action="store_true",
        help="accept new in/out widths (standalone adapter models only; the config is rewritten)",
    )
    p.add_argument(
        "--url",
        metavar="HOST:PORT",
        help="HTTP endpoint of the running server (default: the one `serve` recorded for REPO, if running)",
    )
    p.add_argument("--no-load", action="store_true", help="write the version only; do not ask a server to load it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run, needs=("torch",))


def run(args: argparse.Namespace) -> int:
    from prism_deploy.builder import build_engines
    from prism_deploy.cli.output import print_json, print_table
    from prism_deploy.parity.build_checks import adapter_engine_check
    from prism_deploy.serving.update import update_adapter

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    def build(request: Any) -> Any:
        # the parity gate: each new engine is checked against the PyTorch reference before it serves
        return build_engines(request, adapter_engine_check(request.adapter), log=log)

    report = update_adapter(
        args.repository,
        args.adapter,
        build=build,
        model=args.model,
        allow_shape_change=args.allow_shape_change,
        url=args.url,
        load=not args.no_load,
        log=log,
    )
    if args.json:
        print_json(report)
        return 0
    parity = report.get("parity") or {}
    server = report.get("server")
    print_table(
        ["model", "version", "engine", "build", "build s", "rel_l2", "parity", "server"],
        [
            [
                report["model"],
                report["version"],
                report["engine"],
                report["build"],
                report["build_seconds"],
                parity.get("rel_l2"),
                "pass" if parity.get("passed") else "-",
                "not running (version written; loads at the next start)"
                if server is None
                else f"loaded in {server['loaded_seconds']} s; old version unloaded: {server['old_unloaded']}",
            ]
        ],
    )
    return 0
