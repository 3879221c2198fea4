"""``prism-deploy refit ADAPTER --x X --z Z --workers 12,40-45 -o NEW``: re-solve a few workers."""

from __future__ import annotations

import argparse
from pathlib import Path

from prism_deploy.cli.fit_cmd import add_threads_option, number
from prism_deploy.cli.paths import declare_outputs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("refit", help="re-solve chosen workers exactly, every other tensor byte-identical")
    p.add_argument("adapter", help="adapter .safetensors file (format v1)")
    p.add_argument("--x", required=True, help="model A hidden states [n, in_dim]")
    p.add_argument("--z", required=True, help="targets [n, out_dim], same row count as --x")
    p.add_argument("--workers", required=True, help="worker indices, e.g. 12,40-45")
    p.add_argument("--pipe", type=number("pipe"), default=0, help="pipe of those workers (default 0)")
    p.add_argument("-o", "--output", help="new adapter (default: ADAPTER with suffix .refit.safetensors)")
    p.add_argument("--ridge", type=number("ridge"), default=0.0, help="ridge lambda (default 0)")
    p.add_argument(
        "--holdout", type=number("holdout"), default=0.1, help="held-out fraction, as given to fit (default 0.1)"
    )
    p.add_argument("--seed", type=number("seed"), default=0, help="seed of the held-out split, as given to fit")
    p.add_argument("--chunk-rows", type=number("chunk_rows"), default=4096, help="rows read per chunk (default 4096)")
    add_threads_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    declare_outputs(p, files=("output",), folders=())
    p.set_defaults(func=run, needs=("torch",))


def parse_workers(text: str, count: int) -> list[int]:
    """``"12,40-45"`` -> ``[12, 40, ..., 45]``, each checked against ``[0, count)``."""
    from prism_deploy.core.errors import PrismInputError

    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
            else:
                a = b = int(part)
        except ValueError:
            raise PrismInputError(f"--workers: {part!r} is not an index or a range a-b") from None
        if a > b or a < 0 or b >= count:
            raise PrismInputError(f"--workers: {part!r} is outside [0, {count - 1}] or reversed")
        out.update(range(a, b + 1))
    return sorted(out)


def run(args: argparse.Namespace) -> int:
    from prism_deploy.cli.output import print_json
    from prism_deploy.cli.workers_cmd import _check_dims
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.core.fsutil import check_free_space, check_writable
    from prism_deploy.fit import PairedData, assign_tiles, refit_workers
    from prism_deploy.fit.budget import adapter_bytes, forward_macs, pass_work, step_rows
    from prism_deploy.fit.evaluate import evaluate
    from prism_deploy.fit.progress import overall_progress
    from prism_deploy.fit.routed import refit_work
    from prism_deploy.fit.stream import Split
    from prism_deploy.fit.threads import choose_threads, torch_threads
    from prism_deploy.format import read_adapter_file, write_adapter_file
    from prism_deploy.reference import PrismAdapter

    # The output is checked before anything is read or computed: a refit of minutes must not
    # fail at its write.
    out = Path(args.output) if args.output else Path(args.adapter).with_suffix(".refit.safetensors")
    check_writable(out, "file")  # -o was checked by the CLI; this is the default name
    stored = read_adapter_file(args.adapter)
    cfg = stored.config
    if not 0 <= args.pipe < cfg.num_pipes:
        raise PrismInputError(f"--pipe: {args.pipe} is outside [0, {cfg.num_pipes - 1}]")
    workers = parse_workers(args.workers, cfg.pipes[args.pipe].workers)
    data = PairedData(args.x, args.z, holdout=args.holdout, seed=args.seed, chunk_rows=args.chunk_rows)
    data = data.with_chunk_rows(step_rows(cfg, data.chunk_rows))
    adapter = PrismAdapter(cfg, {k: v.copy() for k, v in stored.tensors.items()})
    _check_dims(adapter, data)
    if data.count("train") == 0:
        raise PrismInputError(f"no training rows: --holdout {args.holdout} holds out all {data.rows} rows")
    itemsize = max(t.itemsize for t in stored.tensors.values())
    check_free_space(out, adapter_bytes(cfg, itemsize))
    split: Split = "holdout" if data.count("holdout") else "train"
    selection = [(args.pipe, w) for w in workers]
    per_row, solves = refit_work(cfg, selection, data.chunk_rows)
    total = (
        2 * data.count(split) * pass_work(forward_macs(cfg), data.chunk_rows) + data.count("train") * per_row + solves
    )
    threads, _ = choose_threads(args.threads)
    with torch_threads(threads), overall_progress(total, "refit"):
        before = evaluate(adapter, data, split)
        new = refit_workers(adapter, data, selection, ridge=args.ridge, desc=f"re-solve {len(workers)} worker(s)")
        assign_tiles(adapter, new)
        after = evaluate(adapter, data, split)

    # Only the chosen tiles change: every other tensor, and every other tile of this pipe,
    # keeps the exact bytes it was read with.
    tensors = dict(stored.tensors)
    name = f"pipes.{args.pipe}.tiles"
    tiles = stored.tensors[name].copy()
    tiles[workers] = adapter.arrays().tiles(args.pipe)[workers]
    tensors[name] = tiles
    write_adapter_file(out, cfg, tensors)
    info = {
        "output": str(out),
        "pipe": args.pipe,
        "workers": workers,
        "split": split,
        "rel_err_before": before.rel_err,
        "rel_err_after": after.rel_err,
        "threads": threads,
    }
    if args.json:
        print_json(info)
    else:
        print(
            f"wrote {out}: refit {len(workers)} worker(s) of pipe {args.pipe}; "
            f"{split} rel err {before.rel_err:.6g} -> {after.rel_err:.6g}"
        )
    return 0
