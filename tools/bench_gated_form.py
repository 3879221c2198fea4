"""Measure the gated lowerings (forms A, B and sparse) on ONNX Runtime CPU.

    python tools/bench_gated_form.py [--threads 1] [--repeats 20] [--precision fp32]

Prints, per shape and tokens (batch*seq), the median latency of each form. The figures in docs/onnx-lowering.md come from this script.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from prism_deploy.core.ort_session import make_session
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.lower import build_model
from prism_deploy.reference import random_adapter

SHAPES = [
    # (label, in_dim, out_dim, grid, tile, top_k)
    ("4096->4096 16x32 of 256x128, top 154", 4096, 4096, (16, 32), (256, 128), 154),
    ("1024->1024 8x8 of 128x128, top 16", 1024, 1024, (8, 8), (128, 128), 16),
    ("256->160 8x8 of 20x32, top 16", 256, 160, (8, 8), (20, 32), 16),
    ("4096->1024 32x4 of 32x1024, top 8", 4096, 1024, (32, 4), (32, 1024), 8),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--forms", nargs="+", default=["A", "B", "sparse"])
    ap.add_argument("--shapes", type=int, nargs="+", default=None, help="indices into SHAPES")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"precision {args.precision}, {args.threads} thread(s), median of {args.repeats}")
    for label, i, o, grid, tile, k in [SHAPES[n] for n in args.shapes] if args.shapes else SHAPES:
        cfg = AdapterConfig(i, o, (PipeSpec("routed", grid, tile, k),))
        adapter = random_adapter(cfg, seed=0)
        sessions = {}
        for form in args.forms:
            model = build_model(adapter, precision=args.precision, gated_form=form)
            sessions[form] = make_session(model.SerializeToString(), "cpu", intra_op_threads=args.threads)
        for t in args.tokens:
            x = rng.standard_normal((1, t, i)).astype(np.float32)
            ms = {}
            for form, sess in sessions.items():
                sess.run(None, {"hidden": x})
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    sess.run(None, {"hidden": x})
                    times.append(time.perf_counter() - t0)
                ms[form] = statistics.median(times) * 1e3
            print(f"{label:40s} T={t:3d}  " + "  ".join(f"{f} {v:8.3f} ms" for f, v in ms.items()), flush=True)


if __name__ == "__main__":
    main()
