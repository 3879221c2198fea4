"""Print a results file of ``prism-deploy bench --json`` as Markdown tables (for the README).

    python benchmarks/summarize.py benchmarks/results/2026-11-25-cpu-example.json [...]

One table per file: the machine line, then per precision and batch each backend's median
and p10-p90 in milliseconds, tokens per second, time relative to torch fp32 eager, relative
to the floor, the same bound if every tile were read (what the portable graph does), and whether the issue's fp32 CPU target is met. Nothing is computed
here that is not in the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def machine_line(d: dict) -> str:
    m = d["machine"]
    gpu = f"GPU {m['gpu']['name']}, driver {m['gpu'].get('driver')}" if m.get("gpu") else "no GPU"
    v = m["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime") if k in v)
    return (
        f"{m['cpu_model']}, {m['cpu_cores']} cores, {gpu}; {libs}; threads {d['settings'].get('threads') or 'default'}; "
        f"load average {m['load_average_start'][0]} at start, {m['load_average_end'][0]} at end; "
        f"{d['started_utc']}"
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def table(d: dict) -> str:
    rates = d["rates"]
    lines = [
        f"`{d['adapter']['path']}` (content sha256 `{d['adapter']['content_sha256'][:12]}`)",
        "",
        f"Machine: {machine_line(d)}. Measured copy bandwidth {rates['copy_bandwidth']['bytes_per_s'] / 2**30:.1f} GiB/s "
        f"(read+write), matmul {rates['matrix_rate']['fp32']['flops_per_s'] / 1e9:.0f} GFLOP/s fp32.",
        "",
        "| precision | batch | backend | median ms | p10-p90 ms | tokens/s | x torch fp32 | x floor (floor ms) | all-tiles bound ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    every = {(f["precision"], f["batch"]): f.get("all_tiles", {}).get("floor_s") for f in d["floors"]}
    order = {"torch": 0, "torch-compile": 1, "ort-cpu": 2, "ort-cuda": 3, "kernel": 4, "trt": 5}
    for c in sorted(
        d["cases"], key=lambda c: (c["precision"] != "fp32", c["precision"], c["batch"], order.get(c["backend"], 9))
    ):
        ratio = f"{c['ratio_to_torch']:.2f}" if c["ratio_to_torch"] is not None else "-"
        lines.append(
            f"| {c['precision']} | {c['batch']} | {c['backend']} | {c['median_s'] * 1e3:.3f} | "
            f"{c['p10_s'] * 1e3:.3f}-{c['p90_s'] * 1e3:.3f} | {c['tokens_per_s']:,.0f} | {ratio} | "
            f"{c['ratio_to_floor']:.1f} ({c['floor_s'] * 1e3:.3f}) | {_ms(every.get((c['precision'], c['batch'])))} |"
        )
    for u in d["backends"]["unavailable"]:
        where = "".join(f" {u[k]}" for k in ("precision", "batch") if u.get(k) is not None)
        lines.append(f"\nNot run: {u['backend']}{where}: {u['reason']}")
    return "\n".join(lines)


def fp32_target(d: dict) -> str:
    """The issue's CPU target: ONNX Runtime CPU at least as fast as torch eager, fp32, every batch."""
    rows = sorted(
        (c for c in d["cases"] if (c["backend"], c["precision"]) == ("ort-cpu", "fp32")), key=lambda c: c["batch"]
    )
    if not rows:
        return "not measured (no ort-cpu fp32 case)"
    parts = [f"batch {c['batch']}: {c['ratio_to_torch']:.2f}x" for c in rows]
    met = all(c["ratio_to_torch"] is not None and c["ratio_to_torch"] <= 1.0 for c in rows)
    return f"{'met' if met else 'MISSED'} (ort-cpu fp32 time / torch fp32 time: {', '.join(parts)})"


def main(argv: list[str]) -> int:
    for path in argv:
        d = json.loads(Path(path).read_text())
        if not isinstance(d, dict) or d.get("schema") != "prism-deploy-bench/1":
            print(f"(skipped {path}: not a prism-deploy bench results file)\n")
            continue
        print(f"### {Path(path).name}\n")
        print(table(d))
        print(f"\nTarget (ORT CPU >= torch eager speed, fp32, every batch): {fp32_target(d)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
