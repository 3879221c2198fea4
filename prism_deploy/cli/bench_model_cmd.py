"""``prism-deploy bench-model DIR [DIR ...]`` (also ``bench --model DIR ...``): model folders side by
side, prefill and per-token decode, against transformers eager and each precision's bytes floor."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prism_deploy.cli.numbers import COUNT, COUNT_OR_ZERO, SEED, THREADS, number
from prism_deploy.cli.output import human_bytes, print_json, print_table
from prism_deploy.cli.paths import declare_outputs
from prism_deploy.core import defaults
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.limits import Limit


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench-model",
        help="time model folders (any precision) side by side: prefill, "
        "decode per token, transformers eager, bytes floor",
    )
    p.add_argument("folders", nargs="+", metavar="DIR", help="folders from export-model or build --model, one role")
    p.add_argument(
        "--hf", metavar="HF_DIR", help="the source model for the eager baseline (default: model.json's source)"
    )
    p.add_argument("--no-eager", action="store_true", help="skip transformers eager")
    p.add_argument(
        "--no-peers",
        action="store_true",
        help="skip the ONNX peers (ONNX Runtime GenAI, llama.cpp) timed beside a last model where installed",
    )
    p.add_argument(
        "--gguf",
        metavar="FILE",
        help="a float (F32/F16/BF16) GGUF file of the folders' model: llama.cpp is timed beside a last "
        "model at the type matching each folder precision (fp32: the file; int8: Q8_0; int4: Q4_0)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="also measure each case's resident memory (VmRSS, VmHWM) in a fresh child process "
        "after the timing, and a baseline Python process's (Linux)",
    )
    p.add_argument(
        "--threads",
        type=number(THREADS),
        default=defaults.BENCH_THREADS,
        help=f"CPU threads for ONNX Runtime and torch (default {defaults.BENCH_THREADS})",
    )
    p.add_argument(
        "--prompt",
        type=number(COUNT),
        default=None,
        help="prompt positions (default 64, fewer where the folders' max_seq is smaller)",
    )
    p.add_argument(
        "--new-tokens",
        type=number(COUNT_OR_ZERO),
        default=None,
        help="decoding steps after the prompt (default 32, fewer where max_seq is smaller; last models)",
    )
    p.add_argument(
        "--repeat",
        type=number(Limit(int, 1, 100_000)),
        default=5,
        help="timed generations per folder, interleaved (default 5)",
    )
    p.add_argument(
        "--warmup", type=number(Limit(int, 0, 100_000)), default=1, help="untimed generations first (default 1)"
    )
    p.add_argument("--seed", type=number(SEED), default=0)
    p.add_argument(
        "--json",
        action="store_true",
        help="print every figure and the machine description as one JSON object (instead of the tables)",
    )
    p.add_argument("--json-out", metavar="FILE", help="also write that JSON object to FILE")
    p.add_argument(
        "--peer-dir",
        metavar="DIR",
        help="keep the peers' builds (ONNX Runtime GenAI's model folders, one per source model and "
        "precision) in DIR and reuse them in later runs (default: built in a temporary folder each run)",
    )
    declare_outputs(p, files=("json_out",), folders=("peer_dir",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prism_deploy.format.model_folder import MODEL_JSON

    for folder in args.folders:
        if not Path(folder, MODEL_JSON).is_file():
            raise PrismInputError(f"{folder}: no model.json (not a folder from export-model or build --model)")
    if args.gguf is not None and not Path(args.gguf).is_file():
        raise PrismInputError(f"{args.gguf}: no such file (--gguf: a float GGUF file of the folders' model)")
    from prism_deploy.bench.models import run_model_bench
    from prism_deploy.core.fsutil import write_text_atomic

    results = run_model_bench(
        args.folders,
        threads=args.threads,
        prompt=args.prompt,
        new_tokens=args.new_tokens,
        repeat=args.repeat,
        warmup=args.warmup,
        seed=args.seed,
        eager=not args.no_eager,
        hf_dir=args.hf,
        peers=not args.no_peers,
        gguf=args.gguf,
        memory=args.memory,
        peer_dir=args.peer_dir,
    )
    if args.json:
        print_json(results)
    else:
        print_report(results)
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json_out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _ratio(stats: dict[str, Any] | None, label: str) -> Any:
    """A speed-up, or ``unstable`` where either timing spread too far to make one."""
    if not stats:
        return None
    return "unstable" if stats.get(label.replace("speedup", "unstable")) else stats.get(label)


def _ms(stats: dict[str, Any] | None, key: str = "median_s") -> Any:
    return None if not stats or stats.get(key) is None else stats[key] * 1e3


def print_report(results: dict[str, Any]) -> None:
    m, s = results["machine"], results["settings"]
    print(
        f"machine: {m['cpu_model']}, {m['cpu_cores']} cores; load average {m['load_average_start']} at start, "
        f"{m['load_average_timed']} after timing; {s['threads']} thread(s), batch 1, prompt {s['prompt']}"
        + (f", {s['new_tokens']} new tokens" if results["role"] == "last" else "")
        + f", {s['repeat']} repetitions"
    )
    rows = []
    for c in results["cases"]:
        pre, dec, floor = c["prefill"], c["decode"], c.get("floor") or {}
        precision = (
            c["precision"]
            + (f" {c['form']}" if c.get("form") else "")
            + (f" b{c['block_size']}" if c.get("block_size") else "")
            + (f" acc{c['accuracy_level']}" if c.get("accuracy_level") is not None else "")
            + (f" as {c['gguf_type']}" if c.get("gguf_type") else "")
        )
        rows.append(
            [
                c["name"],
                precision,
                human_bytes(floor["weights_bytes"]) if floor else "-",
                _ms(pre),
                _ratio(pre, "speedup_vs_eager"),
                (pre or {}).get("ratio_to_floor"),
                _ms(dec),
                _ms(dec, "p90_s"),
                _ratio(dec, "speedup_vs_fp32"),
                _ratio(dec, "speedup_vs_eager"),
                _ms(floor, "decode_s"),
                (dec or {}).get("ratio_to_floor"),
                *([_resident(c.get("memory") or {})] if results.get("memory") else []),
            ]
        )
    print_table(
        [
            "model",
            "precision",
            "weights/token",
            "prefill ms",
            "x eager",
            "x floor",
            "decode ms/tok",
            "p90",
            "x fp32",
            "x eager",
            "floor ms",
            "x floor",
            *(["peak RSS (net)"] if results.get("memory") else []),
        ],
        rows,
    )
    print("x fp32 / x eager: speed-up (above 1 is faster); x floor: median over the bytes floor (1 is the floor)")
    for t in results["targets"]:
        print(
            f"target {t['precision']} ({t['name']}): decode {t['speedup_vs_fp32']:.2f}x fp32 "
            f"(target >= {t['speedup_target']}x: {'met' if t['speedup_met'] else 'missed'}), "
            f"{t['ratio_to_floor']:.2f}x its floor (target <= {t['floor_target']}x: {'met' if t['floor_met'] else 'missed'})"
            f"; {t['applies_to']}"
        )
    for c in results["cases"]:
        if c.get("unstable"):
            print(
                f"unstable: {c['name']}: {'; '.join(c['unstable'])}: its speed-ups are not given "
                "(a busy machine; rerun on a quiet one)"
            )
    memory = results.get("memory")
    if memory:
        base = memory["baseline"]
        print(
            "peak RSS: VmHWM of a fresh process that loaded the case and ran one generation; (net): less "
            + (
                f"a bare Python process's {human_bytes(base['after_run']['hwm_bytes'])}"
                if "after_run" in base
                else f"nothing ({base.get('not_measured') or base.get('error')})"
            )
        )
    for peer, why in (results.get("peers_skipped") or {}).items():
        print(f"skipped: {peer}: {why}")
    if results.get("eager_unavailable"):
        print(f"unavailable: transformers eager: {results['eager_unavailable']}")


def _resident(memory: dict[str, Any]) -> str:
    """A case's peak resident set and, in brackets, net of the baseline process's."""
    if "after_run" not in memory:
        return "not measured" if memory.get("not_measured") else "failed"
    net = memory.get("net_peak_bytes")
    return human_bytes(memory["after_run"]["hwm_bytes"]) + (f" ({human_bytes(net)})" if net is not None else "")
