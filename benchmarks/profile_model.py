"""Where ONNX Runtime CPU spends one decoding step of a model folder: kernel time per op type.

    python benchmarks/profile_model.py DIR [DIR ...] [--past 80] [--threads 1] [--calls 20] [--json FILE]

Runs the folder's KV-cache graph (``lower_with_past.onnx``) on one new position after a past of
``--past`` positions (random values, batch 1) with ONNX Runtime's profiler on, and reports each op
type's mean kernel time per step, and the sum of the rest (the time between kernels: session
overhead, allocation, copies). It explains the figures of ``prism-deploy bench-model``; it is not
itself a timing to quote. The graph is run as ``bench-model`` runs it (the export's own file,
ONNX Runtime's default optimizations).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path


def profile(folder: str, past: int, threads: int, calls: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from prism_deploy.bench.machine import load_average
    from prism_deploy.models.export import past_names, read_manifest

    manifest = read_manifest(folder, "lower")
    d = manifest["dims"]
    load_start = load_average()
    rng = np.random.default_rng(0)
    feeds = {"inputs_embeds": rng.normal(0, 0.02, size=(1, 1, d["hidden"])).astype(np.float32),
             "attention_mask": np.ones((1, past + 1), dtype=np.int64)}
    for name in past_names(d["layers"]):
        feeds[name] = rng.normal(size=(1, d["kv_heads"], past, d["head_dim"])).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="prism-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(Path(folder) / manifest["files"]["graph_with_past"]["name"]), opts,
                                       providers=["CPUExecutionProvider"])
        for _ in range(3 + calls):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-calls:]
    t0 = runs[0]["ts"]
    step_us = sum(r["dur"] for r in runs) / calls
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0:
            by_op[e["args"].get("op_name", "?")] += e["dur"] / calls
    kernels = sum(by_op.values())
    return {"folder": folder, "precision": manifest["precision"], "quantization": {k: v for k, v in
            (manifest.get("quantization") or {}).items() if k != "graphs"}, "past": past, "threads": threads,
            "calls": calls, "step_us": step_us, "kernels_us": kernels, "between_kernels_us": step_us - kernels,
            "by_op_us": dict(sorted(by_op.items(), key=lambda kv: -kv[1])), "load_average": [load_start, load_average()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--past", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--json", help="append the results to this JSON list")
    args = parser.parse_args(argv)
    results = []
    for folder in args.folders:
        r = profile(folder, args.past, args.threads, args.calls)
        results.append(r)
        top = ", ".join(f"{op} {us / 1e3:.2f}" for op, us in list(r["by_op_us"].items())[:6])
        print(f"{folder} ({r['precision']}): step {r['step_us'] / 1e3:.2f} ms = kernels {r['kernels_us'] / 1e3:.2f} ms "
              f"({top}) + between kernels {r['between_kernels_us'] / 1e3:.2f} ms; load {r['load_average']}")
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps(old + results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
