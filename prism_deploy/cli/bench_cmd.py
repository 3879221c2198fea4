"""``prism-deploy bench ADAPTER``: latency of every available backend side by side, with the floor."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prism_deploy.cli.output import human_bytes, print_table
from prism_deploy.cli.paths import declare_outputs
from prism_deploy.core.errors import PrismInputError

if TYPE_CHECKING:
    from prism_deploy.bench import BenchSettings

DEFAULT_BACKENDS = "torch,torch-compile,ort-cpu,ort-cuda,trt,kernel"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="time every available backend on the same inputs, against the floor")
    p.add_argument("adapter", help="adapter .safetensors file (format v1)")
    p.add_argument("--engines", metavar="DIR", help="engines from prism-deploy build (needed for trt)")
    p.add_argument("--backends", default=DEFAULT_BACKENDS, help=f"comma list (default {DEFAULT_BACKENDS})")
    p.add_argument("--precision", default="fp32", help="comma list of fp32,fp16,int8,int8-qdq (default fp32)")
    p.add_argument("--batch", default="1,8,64", help="comma list of batch sizes (default 1,8,64)")
    p.add_argument("--seq", default="1", help="sequence length per batch row (default 1)")
    p.add_argument("--warmup", default="200", metavar="MS", help="warm-up time per case in ms (default 200)")
    p.add_argument("--repeat", default="30", metavar="N", help="timed calls per case (default 30)")
    p.add_argument("--threads", metavar="N", help="CPU threads for torch and ONNX Runtime (default: each library's own)")
    p.add_argument("--seed", default="0", help="seed of the random inputs (default 0)")
    p.add_argument("--json", metavar="FILE", help="write every figure and the machine description here")
    p.add_argument("--plot", metavar="FILE.png", help="draw latency against batch (needs matplotlib)")
    declare_outputs(p, files=("json", "plot"), folders=())
    p.set_defaults(func=run, needs=("torch",))


def _int_list(option: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise PrismInputError(f"{option}: {text!r} is not a comma list of integers") from None
    if not values:
        raise PrismInputError(f"{option}: give at least one value")
    return values


def _number(option: str, text: str, kind: type = int) -> float:
    try:
        return kind(text)
    except ValueError:
        raise PrismInputError(f"{option}: {text!r} is not a{'n integer' if kind is int else ' number'}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    from prism_deploy.bench import BenchSettings

    settings = BenchSettings(
        backends=_names(args.backends),
        precisions=_names(args.precision),
        batches=_int_list("--batch", args.batch),
        seq=int(_number("--seq", args.seq)),
        warmup_ms=float(_number("--warmup", args.warmup, float)),
        repeat=int(_number("--repeat", args.repeat)),
        engines_dir=Path(args.engines) if args.engines else None,
        seed=int(_number("--seed", args.seed)),
        threads=int(_number("--threads", args.threads)) if args.threads is not None else None,
    )
    settings.validate()
    return settings


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if not Path(args.adapter).is_file():
        raise PrismInputError(f"{args.adapter}: no such adapter file")
    for option, value in (("--json", args.json), ("--plot", args.plot)):
        if value and Path(value).is_dir():
            raise PrismInputError(f"{option}: {value} is a directory, give a file name")
    if args.plot:
        from prism_deploy.bench.plot import require_matplotlib

        require_matplotlib()  # fail before the timing, not after it

    from prism_deploy.bench import run_bench
    from prism_deploy.core.fsutil import write_text_atomic

    results = run_bench(args.adapter, settings)
    print_report(results)
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        from prism_deploy.bench.plot import plot_results

        plot_results(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def print_report(results: dict[str, Any]) -> None:
    m, r = results["machine"], results["rates"]
    gpu = f", GPU {m['gpu']['name']} (driver {m['gpu'].get('driver', '?')})" if m.get("gpu") else ", no GPU"
    print(f"machine: {m['cpu_model']}, {m['cpu_cores']} cores{gpu}; load average "
          f"{m['load_average_start']} at start, {m['load_average_end']} at end")
    bw = r["copy_bandwidth"]["bytes_per_s"]
    print(f"measured: copy {human_bytes(bw)}/s (read+write), matmul "
          + ", ".join(f"{k} {v['flops_per_s'] / 1e9:.1f} GFLOP/s" for k, v in r["matrix_rate"].items()))
    a = results["adapter"]
    print(f"adapter: {a['path']} ({a['describe']['in_dim']} -> {a['describe']['out_dim']}, "
          f"{len(a['config']['pipes'])} pipe(s), {human_bytes(a['describe']['bytes'])})")
    rows = []
    for c in sorted(results["cases"], key=lambda c: (c["precision"], c["batch"], c["backend"])):
        rows.append([c["precision"], c["batch"], c["backend"], c["median_s"] * 1e3, c["p10_s"] * 1e3,
                     c["p90_s"] * 1e3, c["tokens_per_s"], c["ratio_to_torch"], c["floor_s"] * 1e3,
                     c["ratio_to_floor"], c["max_rel_err"], human_bytes(c["memory"]["peak_rss_bytes"] or 0)])
    print_table(["prec", "batch", "backend", "median ms", "p10 ms", "p90 ms", "tok/s", "x torch",
                 "floor ms", "x floor", "rel err", "peak RSS"], rows)
    print("x torch: median over torch fp32 eager at the same batch (below 1 is faster); "
          "x floor: median over the bytes/FLOPs floor")
    for u in results["backends"]["unavailable"]:
        where = "".join(f" {u[k]}" for k in ("precision", "batch") if u.get(k) is not None)
        print(f"unavailable: {u['backend']}{where}: {u['reason']}")
