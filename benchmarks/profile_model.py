"""Where ONNX Runtime CPU spends one decoding step of a model folder: kernel time per op type.

    python benchmarks/profile_model.py DIR [DIR ...] [--past 80] [--threads 1] [--calls 20] [--json FILE]
    python benchmarks/profile_model.py DIR [DIR ...] --weights-only [--threads 1] [--calls 50]

Runs the folder's KV-cache graph (``lower_with_past.onnx``) on one new position after a past of
``--past`` positions (random values, batch 1) with ONNX Runtime's profiler on, and reports each op
type's mean kernel time per step, and the sum of the rest (the time between kernels: session
overhead, allocation, copies). It explains the figures of ``prism-deploy bench-model``; it is not
itself a timing to quote. The graph is run as ``bench-model`` runs it (the export's own file,
ONNX Runtime's default optimizations).

``--weights-only`` times, without the profiler (whose per-node events inflate small ops), a graph
of the step's weight operations alone: every MatMul / MatMulNBits / DequantizeLinear+MatMul of
the KV-cache graph with its stored weights, each fed its own [1, 1, K] input. The full step's
time minus this is what the rest of the graph (norms, attention, rotary, masks, shapes, the KV
concatenation) costs; interleaved with the full step, median of ``--calls``.
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
    from prism_deploy.models.lm_export import past_names, read_manifest

    manifest = read_manifest(folder, "lower")
    d = manifest["dims"]
    load_start = load_average()
    rng = np.random.default_rng(0)
    feeds = {
        "inputs_embeds": rng.normal(0, 0.02, size=(1, 1, d["hidden"])).astype(np.float32),
        "attention_mask": np.ones((1, past + 1), dtype=np.int64),
    }
    for name in past_names(d["layers"]):
        feeds[name] = rng.normal(size=(1, d["kv_heads"], past, d["head_dim"])).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="prism-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(
            str(Path(folder) / manifest["files"]["graph_with_past"]["name"]), opts, providers=["CPUExecutionProvider"]
        )
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
    return {
        "folder": folder,
        "precision": manifest["precision"],
        "quantization": {k: v for k, v in (manifest.get("quantization") or {}).items() if k != "graphs"},
        "past": past,
        "threads": threads,
        "calls": calls,
        "step_us": step_us,
        "kernels_us": kernels,
        "between_kernels_us": step_us - kernels,
        "by_op_us": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "load_average": [load_start, load_average()],
    }


def weights_only(folder: str, threads: int, calls: int, past: int) -> dict:
    """Median seconds of the full decoding step and of its weight operations alone (see above)."""
    import time

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from prism_deploy.bench.machine import load_average
    from prism_deploy.models.lm_export import past_names, read_manifest

    manifest = read_manifest(folder, "lower")
    path = Path(folder) / manifest["files"]["graph_with_past"]["name"]
    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    keep, inputs, outputs = [], [], []
    for node in model.graph.node:
        weight_fed = node.op_type == "MatMulNBits" or (
            node.op_type == "MatMul"
            and (
                node.input[1] in inits
                or (node.input[1] in producers and producers[node.input[1]].op_type == "DequantizeLinear")
            )
        )
        if not weight_fed:
            continue
        if node.op_type == "MatMul" and node.input[1] in producers:
            keep.append(producers[node.input[1]])
        k = next(a.i for a in node.attribute if a.name == "K") if node.op_type == "MatMulNBits" else None
        if k is None:
            w = node.input[1]
            dims = (
                next(t for t in model.graph.initializer if t.name == w).dims
                if w in inits
                else next(t for t in model.graph.initializer if t.name == producers[w].input[0]).dims
            )
            k = dims[0]
        x = f"x{len(inputs)}"
        inputs.append(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, 1, k]))
        outputs.append(helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        clone.input[0] = x
        keep.append(clone)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    used = {i for n in keep for i in n.input}
    kept_inits = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    weights = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    d = manifest["dims"]
    wfeeds = {
        i.name: rng.normal(size=[1, 1, i.type.tensor_type.shape.dim[2].dim_value]).astype(np.float32) for i in inputs
    }
    ffeeds = {
        "inputs_embeds": rng.normal(0, 0.02, size=(1, 1, d["hidden"])).astype(np.float32),
        "attention_mask": np.ones((1, past + 1), dtype=np.int64),
    }
    for name in past_names(d["layers"]):
        ffeeds[name] = rng.normal(size=(1, d["kv_heads"], past, d["head_dim"])).astype(np.float32)
    load_start = load_average()
    times: dict[str, list[float]] = {"full": [], "weights": []}
    for i in range(calls + 3):
        for label, sess, feeds in (("full", full, ffeeds), ("weights", weights, wfeeds)):
            t0 = time.perf_counter_ns()
            sess.run(None, feeds)
            if i >= 3:
                times[label].append((time.perf_counter_ns() - t0) * 1e-9)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "folder": folder,
        "precision": manifest["precision"],
        "weight_nodes": len(inputs),
        "past": past,
        "threads": threads,
        "calls": calls,
        "full_step_s": med["full"],
        "weights_only_s": med["weights"],
        "rest_s": med["full"] - med["weights"],
        "nodes_in_step": len(onnx.load(str(path), load_external_data=False).graph.node),
        "load_average": [load_start, load_average()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--past", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--weights-only", action="store_true", help="time the weight operations alone (see above)")
    parser.add_argument("--json", help="append the results to this JSON list")
    args = parser.parse_args(argv)
    results = []
    for folder in args.folders if args.weights_only else []:
        r = weights_only(folder, args.threads, args.calls, args.past)
        results.append(r)
        print(
            f"{folder} ({r['precision']}): step {r['full_step_s'] * 1e3:.2f} ms, its {r['weight_nodes']} weight ops alone "
            f"{r['weights_only_s'] * 1e3:.2f} ms, the other {r['nodes_in_step'] - r['weight_nodes']} nodes "
            f"{r['rest_s'] * 1e3:.2f} ms; load {r['load_average']}"
        )
    for folder in [] if args.weights_only else args.folders:
        r = profile(folder, args.past, args.threads, args.calls)
        results.append(r)
        top = ", ".join(f"{op} {us / 1e3:.2f}" for op, us in list(r["by_op_us"].items())[:6])
        print(
            f"{folder} ({r['precision']}): step {r['step_us'] / 1e3:.2f} ms = kernels {r['kernels_us'] / 1e3:.2f} ms "
            f"({top}) + between kernels {r['between_kernels_us'] / 1e3:.2f} ms; load {r['load_average']}"
        )
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps(old + results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
