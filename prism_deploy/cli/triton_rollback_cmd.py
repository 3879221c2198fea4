"""``prism-deploy triton rollback REPO [--model NAME] [--to VERSION]``: serve an earlier adapter version again."""

from __future__ import annotations

import argparse
import sys

from prism_deploy.cli.numbers import number
from prism_deploy.core.limits import Limit


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "triton-rollback",
        help="serve an earlier version of an adapter model again (hot-swap, as `triton update`)",
        description="Also spelled `prism-deploy triton rollback`. The earlier version's files are written again as "
        "the next version and loaded; the versions beyond --keep are removed.",
    )
    p.add_argument("repository", metavar="REPO", help="a repository written by `prism-deploy triton`")
    p.add_argument("--model", help="the adapter model (default: the repository's only one)")
    p.add_argument(
        "--to",
        type=number(Limit(int, 1, 1 << 40)),
        metavar="VERSION",
        help="the version to restore (default: the one before the served version)",
    )
    p.add_argument("--keep", type=number(Limit(int, 1, 1 << 20)), default=5, help="versions kept (default 5)")
    p.add_argument(
        "--url",
        metavar="HOST:PORT",
        help="HTTP endpoint of the running server (default: the one `serve` recorded for REPO, if running)",
    )
    p.add_argument("--no-load", action="store_true", help="write the version only; do not ask a server to load it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prism_deploy.cli.output import print_json
    from prism_deploy.serving.versions import rollback

    report = rollback(
        args.repository,
        args.model,
        to=args.to,
        url=args.url,
        load=not args.no_load,
        keep=args.keep,
        log=lambda m: print(m, file=sys.stderr),
    )
    if args.json:
        print_json(report)
        return 0
    server = report["server"]
    print(
        f"{report['model']}: version {report['version']} serves the files of version {report['restored']} "
        f"(was {report['previous']}); "
        + (
            "server not running (loads at the next start)"
            if server is None
            else f"loaded in {server['loaded_seconds']} s; old version unloaded: {server['old_unloaded']}"
        )
        + (f"; removed versions {', '.join(map(str, report['removed']))}" if report["removed"] else "")
    )
    return 0
