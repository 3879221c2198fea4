"""``prism-deploy bench ADAPTER``: latency of every available backend side by side, with the floor."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prism_deploy.cli.numbers import COUNT, SEED, THREADS, number, number_list
from prism_deploy.cli.output import human_bytes, print_json, print_table
from prism_deploy.cli.paths import declare_outputs
from prism_deploy.core import defaults
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.limits import Limit
from prism_deploy.core.precision import PRECISIONS, Precision

if TYPE_CHECKING:
    from prism_deploy.bench import BenchSettings

DEFAULT_BACKENDS = "torch,torch-compile,ort-cpu,ort-cuda,trt,kernel"
# a case whose 90th percentile is over this many times its 10th is flagged: its median does not repeat
NOISY_SPREAD = 2.0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="time every available backend on the same inputs, against the floor")
    p.add_argument("adapter", help="adapter .safetensors file (format v1)")
    p.add_argument("--engines", metavar="DIR", help="engines from prism-deploy build (needed for trt)")
    p.add_argument("--backends", default=DEFAULT_BACKENDS, help=f"comma list (default {DEFAULT_BACKENDS})")
    p.add_argument(
        "--precision",
        default=defaults.PRECISION.value,
        help=f"comma list of {','.join(PRECISIONS)} (default {defaults.PRECISION})",
    )
    p.add_argument(
        "--batch",
        type=number_list(COUNT),
        default=defaults.BENCH_BATCHES,
        help=f"comma list of batch sizes (default {','.join(map(str, defaults.BENCH_BATCHES))})",
    )
    p.add_argument("--seq", type=number(COUNT), default=1, help="sequence length per batch row (default 1)")
    p.add_argument(
        "--warmup",
        type=number(Limit(float, 0.0, 3.6e6)),
        default=200.0,
        metavar="MS",
        help="warm-up time per case in ms (default 200)",
    )
    p.add_argument(
        "--repeat",
        type=number(Limit(int, 1, 1_000_000)),
        default=30,
        metavar="N",
        help="timed calls per case (default 30)",
    )
    p.add_argument(
        "--threads",
        type=number(THREADS),
        default=defaults.BENCH_THREADS,
        metavar="N",
        help=f"CPU threads for torch and ONNX Runtime (default {defaults.BENCH_THREADS}: each library's "
        "own default oversubscribes a shared machine and its figures do not repeat; docs/bench.md)",
    )
    p.add_argument("--seed", type=number(SEED), default=0, help="seed of the random inputs (default 0)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print every figure and the machine description as one JSON object (instead of the tables)",
    )
    p.add_argument("--json-out", metavar="FILE", help="also write that JSON object to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="draw latency against batch (needs matplotlib)")
    p.add_argument(
        "--model",
        action="store_true",
        help="time model folders instead of an adapter: bench --model DIR [DIR ...] takes the options "
        "of bench-model (prefill, decode per token; see prism-deploy bench-model --help)",
    )
    declare_outputs(p, files=("json_out", "plot"), folders=())
    p.set_defaults(func=run, needs=("torch",))


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    from prism_deploy.bench import BenchSettings

    settings = BenchSettings(
        backends=_names(args.backends),
        precisions=tuple(Precision.parse(name) for name in _names(args.precision)),  # the CLI's edge
        batches=tuple(int(b) for b in args.batch),
        seq=int(args.seq),
        warmup_ms=float(args.warmup),
        repeat=int(args.repeat),
        engines_dir=Path(args.engines) if args.engines else None,
        seed=int(args.seed),
        threads=int(args.threads),
    )
    settings.validate()
    return settings


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if not Path(args.adapter).is_file():
        from prism_deploy.format.model_folder import not_an_adapter

        reason = not_an_adapter(args.adapter)
        if reason is not None:
            raise PrismInputError(f"{args.adapter}: {reason} (time model folders with bench --model)")
        raise PrismInputError(f"{args.adapter}: no such adapter file")
    if args.plot:
        from prism_deploy.bench.plot import require_matplotlib

        require_matplotlib()  # fail before the timing, not after it

    from prism_deploy.bench import run_bench
    from prism_deploy.core.fsutil import write_text_atomic

    results = run_bench(args.adapter, settings)
    if args.json:
        print_json(results)
    else:
        print_report(results)
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json_out}", file=sys.stderr if args.json else sys.stdout)
    if args.plot:
        from prism_deploy.bench.plot import plot_results

        plot_results(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def print_report(results: dict[str, Any]) -> None:
    m, r = results["machine"], results["rates"]
    gpu = f", GPU {m['gpu']['name']} (driver {m['gpu'].get('driver', '?')})" if m.get("gpu") else ", no GPU"
    print(
        f"machine: {m['cpu_model']}, {m['cpu_cores']} cores{gpu}; load average "
        f"{m['load_average_start']} at start, {m['load_average_end']} at end"
    )
    bw = r["copy_bandwidth"]["bytes_per_s"]
    print(
        f"measured: copy {human_bytes(bw)}/s (read+write), matmul "
        + ", ".join(f"{k} {v['flops_per_s'] / 1e9:.1f} GFLOP/s" for k, v in r["matrix_rate"].items())
    )
    a = results["adapter"]
    print(
        f"adapter: {a['path']} ({a['describe']['in_dim']} -> {a['describe']['out_dim']}, "
        f"{len(a['config']['pipes'])} pipe(s), {human_bytes(a['describe']['bytes'])})"
    )
    rows, noisy = [], []
    for c in sorted(results["cases"], key=lambda c: (c["precision"], c["batch"], c["backend"])):
        spread = c["p90_s"] / c["p10_s"] if c["p10_s"] > 0 else float("inf")
        if spread > NOISY_SPREAD:
            noisy.append(f"{c['backend']} {c['precision']} batch {c['batch']}")
        rows.append(
            [
                c["precision"],
                c["batch"],
                c["backend"],
                c["median_s"] * 1e3,
                c["p10_s"] * 1e3,
                c["p90_s"] * 1e3,
                f"{spread:.2f}" + (" !" if spread > NOISY_SPREAD else ""),
                c["tokens_per_s"],
                c["ratio_to_torch"],
                c["floor_s"] * 1e3,
                c["ratio_to_floor"],
                c["max_rel_err"],
                human_bytes(c["memory"]["peak_rss_bytes"] or 0),
            ]
        )
    print_table(
        [
            "prec",
            "batch",
            "backend",
            "median ms",
            "p10 ms",
            "p90 ms",
            "p90/p10",
            "tok/s",
            "x torch",
            "floor ms",
            "x floor",
            "rel err",
            "peak RSS",
        ],
        rows,
    )
    if noisy:
        print(
            f"noisy (p90/p10 over {NOISY_SPREAD:g}, marked !): {', '.join(noisy)}: the machine was busy or "
            "threads contended; their medians do not repeat (run again, or with fewer --threads)"
        )
    print(
        "x torch: median over torch fp32 eager at the same batch (below 1 is faster); "
        "x floor: median over the bytes/FLOPs floor"
    )
    for u in results["backends"]["unavailable"]:
        where = "".join(f" {u[k]}" for k in ("precision", "batch") if u.get(k) is not None)
        print(f"unavailable: {u['backend']}{where}: {u['reason']}")
