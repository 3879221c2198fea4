"""Where ONNX Runtime CPU spends a call: kernel time per op type of the exported graph.

    python benchmarks/profile_ort.py ADAPTER --precision int8 --batch 1 [--form sparse] [--threads 1] [--calls 5] [--json FILE]

Exports the adapter with ``prism_deploy.lower.export_onnx``, runs it with ONNX Runtime's
profiler on, and reports each op type's (and the top nodes') mean kernel time per call. It
explains the figures of ``prism-deploy bench``; it is not itself a timing to quote.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path


def profile(adapter_path: str, precision: str, batch: int, threads: int, calls: int, form: str = "auto") -> dict:
    import numpy as np
    import onnxruntime as ort

    from prism_deploy.bench.machine import describe_machine, load_average
    from prism_deploy.lower import export_onnx
    from prism_deploy.reference import load_adapter

    adapter = load_adapter(adapter_path)
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="prism-profile-") as tmp:
        path = Path(tmp) / "adapter.onnx"
        extra = {}
        if precision == "int8-qdq":
            extra["calib"] = np.random.default_rng(12345).standard_normal(
                (256, adapter.config.in_dim), dtype=np.float32
            )
        export_onnx(adapter, path, precision=precision, gated_form=form, **extra)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        io = session.get_inputs()[0]
        dtype = np.float16 if "float16" in io.type else np.float32
        x = np.random.default_rng(0).standard_normal((batch, 1, adapter.config.in_dim)).astype(dtype)
        for _ in range(2):  # warm-up calls are in the profile too: drop them below
            session.run(None, {io.name: x})
        for _ in range(calls):
            session.run(None, {io.name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    timed = runs[-calls:]
    t0 = timed[0]["ts"]
    by_op: dict[str, float] = defaultdict(float)
    by_node: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0:
            by_op[e["args"].get("op_name", "?")] += e["dur"] / calls
            by_node[e["name"].removesuffix("_kernel_time")] += e["dur"] / calls
    total = sum(by_op.values())
    return {
        "adapter": adapter_path,
        "precision": precision,
        "gated_form": form,
        "batch": batch,
        "threads": threads,
        "calls": calls,
        "model_run_ms": sum(r["dur"] for r in timed) / calls / 1e3,
        "kernel_ms": total / 1e3,
        "by_op_type": [
            {"op": k, "ms": v / 1e3, "share": v / total} for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])
        ],
        "top_nodes": [{"node": k, "ms": v / 1e3} for k, v in sorted(by_node.items(), key=lambda kv: -kv[1])[:8]],
        "machine": {k: v for k, v in describe_machine().items() if k in ("cpu_model", "cpu_cores", "versions")},
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapter")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--form", default="auto", help="gated form: auto, A, B, sparse, grouped")
    p.add_argument("--json", help="append this profile to a JSON list in FILE")
    args = p.parse_args(argv)
    result = profile(args.adapter, args.precision, args.batch, args.threads, args.calls, args.form)
    print(
        f"{args.adapter} {args.precision} form {args.form} batch {args.batch}, {args.threads} thread(s): "
        f"{result['model_run_ms']:.2f} ms per run, {result['kernel_ms']:.2f} ms in kernels"
    )
    for row in result["by_op_type"][:8]:
        print(f"  {row['op']:<20} {row['ms']:9.3f} ms  {row['share'] * 100:5.1f} %")
    if args.json:
        from prism_deploy.core.fsutil import write_text_atomic

        path = Path(args.json)
        existing = json.loads(path.read_text()) if path.exists() else []
        write_text_atomic(path, json.dumps([*existing, result], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
