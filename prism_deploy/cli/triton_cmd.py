"""``prism-deploy triton BUILD_DIR... -o REPO [--backend python|native] ...``: a Triton model repository.

``triton update`` and ``triton env`` are commands of their own (``triton_update_cmd``,
``triton_env_cmd``); ``main`` routes ``triton update ...`` and ``triton env ...`` to them.
"""

from __future__ import annotations

import argparse

from prism_deploy.cli.numbers import COUNT, number
from prism_deploy.cli.paths import declare_outputs
from prism_deploy.core.limits import Limit


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "triton",
        help="write a Triton Inference Server model repository from built stages (docs/serving.md)",
        description="BUILD_DIR...: the stages of one chain in order (first model, adapter, [middle model, "
        "adapter]..., last model: `export-model`/`build --model` folders and adapter `build` folders), "
        "or adapter build folders only, or one `build --graph` folder (a Triton ensemble `graph` and "
        "`generate`, docs/graphs.md). Also: `triton update REPO --adapter FILE`, `triton env`.",
    )
    p.add_argument("stages", nargs="+", metavar="BUILD_DIR", help="build or export folders, in chain order")
    p.add_argument(
        "-o", "--output", required=True, metavar="REPO", help="the repository folder to write (new or empty)"
    )
    p.add_argument(
        "--backend",
        default="python",
        choices=("python", "native"),
        help="python: every stage a Python-backend model running the project's runtime (any Triton, "
        "CPU included; default); native: Triton's onnxruntime/tensorrt backends (GPU containers)",
    )
    p.add_argument(
        "--precision", help="the engine to serve when a build folder has several (fp32, fp16, int8, int8-qdq)"
    )
    p.add_argument("--target", help="the engine target to serve when a build folder has several")
    p.add_argument(
        "--engine-id",
        metavar="ID",
        help="the engine to serve, by its manifest id (when precision and target leave several: whole "
        "and per-pipe builds)",
    )
    p.add_argument(
        "--instances",
        type=number(Limit(int, 1, 1024)),
        default=1,
        help="model instances per stage (instance_group count; default 1)",
    )
    p.add_argument(
        "--max-queue-delay-us",
        type=number(Limit(int, 0, 10**9)),
        default=100,
        help="dynamic batching: longest wait to fill a batch, microseconds (default 100)",
    )
    p.add_argument(
        "--stream", action="store_true", help="also write generate_stream (decoupled: one response per token)"
    )
    p.add_argument(
        "--max-new-tokens-limit",
        type=number(COUNT),
        default=256,
        help="the most tokens one generate request may ask for",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    declare_outputs(p, files=(), folders=("output",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prism_deploy.cli.output import print_json, print_table
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.serving import repository
    from prism_deploy.serving.graph_repository import is_graph, plan_graph

    graphs = [stage for stage in args.stages if is_graph(stage)]
    if graphs and len(args.stages) > 1:
        raise PrismInputError(f"{graphs[0]}: a graph is served on its own (give its `build --graph` folder alone)")
    if args.max_queue_delay_us < 0:
        raise PrismInputError(f"--max-queue-delay-us: {args.max_queue_delay_us} must be >= 0")
    options = repository.Options(
        backend=args.backend,
        precision=args.precision,
        target=args.target,
        engine_id=args.engine_id,
        instances=args.instances,
        max_queue_delay_us=args.max_queue_delay_us,
        stream=args.stream,
        max_new_tokens_limit=args.max_new_tokens_limit,
    )
    entries, manifest = plan_graph(graphs[0], options) if graphs else repository.plan(args.stages, options)
    out = repository.write(args.output, entries, manifest)
    if args.json:
        print_json({"repository": str(out), **manifest})
        return 0
    rows = []
    for e in entries:
        c = e.config
        kind = e.stage.kind if e.role == "stage" and e.stage is not None else e.role
        where = c.get("backend") or c.get("platform")
        batching = f"max {c['max_batch_size']}" + (", dynamic" if "dynamic_batching" in c else "")
        group = c.get("instance_group", [{}])[0]
        rows.append(
            [
                e.name,
                kind,
                where,
                batching,
                f"{group.get('kind', '-')} x{group.get('count', '-')}" if group else "-",
                str(e.stage.source) if e.stage is not None else "-",
            ]
        )
    print_table(["model", "kind", "backend", "batching", "instances", "from"], rows)
    print(f"repository: {out} ({manifest['backend']} form); serve it with `prism-deploy serve {out}`")
    return 0
