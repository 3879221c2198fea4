"""What the sparse gated form's one-token call costs on ONNX Runtime CPU, piece by piece: the
``Gather`` of the selected tiles alone, the batched ``MatMul`` alone (its tiles fed as an input),
both together in either operand order, and a numpy copy of the same bytes, all on one thread.

    python benchmarks/sparse_gather_cost.py [--tiles 512] [--selected 154] [--tile 256x128]
        [--repeats 15] [-o results.json]

It explains docs/bench.md's one-token figure for the three-gated-pipe adapter (one pipe's
shapes by default): whether the miss of the 2.0x-floor target is the copy, the multiply's read
rate, or the operand order (ONNX Runtime packs a MatMul's dynamic B operand per call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _session(nodes, inputs, outputs, initializers):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def measure(workers: int, selected: int, tr: int, tc: int, repeats: int) -> dict:
    from onnx import TensorProto, helper, numpy_helper

    def info(name, shape, dtype=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, dtype, shape)

    rng = np.random.default_rng(0)
    tiles = rng.standard_normal((workers, tr, tc), dtype=np.float32)
    tiles_t = np.ascontiguousarray(tiles.transpose(0, 2, 1))
    idx = np.sort(rng.choice(workers, selected, replace=False)).astype(np.int64)
    k = selected
    idx_in = info("idx", [k], TensorProto.INT64)
    cases = {
        # x [k,1,tc] @ tiles^T [k,tc,tr]: the tiles are MatMul's B operand
        "gather+matmul, x @ W^T": (
            _session(
                [helper.make_node("Gather", ["w", "idx"], ["g"]), helper.make_node("MatMul", ["x", "g"], ["y"])],
                [info("x", [k, 1, tc]), idx_in],
                [info("y", [k, 1, tr])],
                [numpy_helper.from_array(tiles_t, "w")],
            ),
            {"x": rng.standard_normal((k, 1, tc), dtype=np.float32), "idx": idx},
        ),
        # W [k,tr,tc] @ x [k,tc,1]: the tiles are MatMul's A operand
        "gather+matmul, W @ x": (
            _session(
                [helper.make_node("Gather", ["w", "idx"], ["g"]), helper.make_node("MatMul", ["g", "x"], ["y"])],
                [info("x", [k, tc, 1]), idx_in],
                [info("y", [k, tr, 1])],
                [numpy_helper.from_array(tiles, "w")],
            ),
            {"x": rng.standard_normal((k, tc, 1), dtype=np.float32), "idx": idx},
        ),
        "gather only": (
            _session(
                [helper.make_node("Gather", ["w", "idx"], ["y"])],
                [idx_in],
                [info("y", [k, tr, tc])],
                [numpy_helper.from_array(tiles, "w")],
            ),
            {"idx": idx},
        ),
        "matmul only, W @ x": (
            _session(
                [helper.make_node("MatMul", ["g", "x"], ["y"])],
                [info("g", [k, tr, tc]), info("x", [k, tc, 1])],
                [info("y", [k, tr, 1])],
                [],
            ),
            {"g": tiles[idx], "x": rng.standard_normal((k, tc, 1), dtype=np.float32)},
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in [*cases, "numpy copy of the selected tiles"]}
    selected_tiles = tiles[idx]
    out = np.empty_like(selected_tiles)
    for _ in range(repeats):  # interleaved: each repetition times every case once
        for name, (session, feeds) in cases.items():
            session.run(None, feeds)
            t0 = time.perf_counter()
            for _ in range(10):
                session.run(None, feeds)
            times[name].append((time.perf_counter() - t0) / 10)
        t0 = time.perf_counter()
        np.copyto(out, selected_tiles)
        times["numpy copy of the selected tiles"].append(time.perf_counter() - t0)
    nbytes = selected_tiles.nbytes
    return {
        "shapes": {"workers": workers, "selected": k, "tile": [tr, tc], "selected_bytes": nbytes},
        "cases": {
            name: {
                "min_ms": round(min(t) * 1e3, 4),
                "median_ms": round(statistics.median(t) * 1e3, 4),
                "bytes_per_s_at_min": round(nbytes / min(t)),
            }
            for name, t in times.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", type=int, default=512)
    p.add_argument("--selected", type=int, default=154)
    p.add_argument("--tile", default="256x128", help="rows x columns of one tile")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("-o", "--output", help="write the results as JSON")
    args = p.parse_args(argv)
    tr, tc = (int(v) for v in args.tile.split("x"))
    from prism_deploy.bench.machine import describe_machine, load_average

    load_start = load_average()
    result = measure(args.tiles, args.selected, tr, tc, args.repeats)
    result.update(
        machine={k: v for k, v in describe_machine().items() if k in ("cpu_model", "cpu_cores", "versions")},
        load_average_start=load_start,
        load_average_end=load_average(),
        command=" ".join(["python", *sys.argv]),
        finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    for name, row in result["cases"].items():
        print(
            f"{name:<36} min {row['min_ms']:7.3f} ms  median {row['median_ms']:7.3f} ms  {row['bytes_per_s_at_min'] / 1e9:6.1f} GB/s"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
