"""Error figures and file size of every precision, for docs/precision.md.

    python tools/precision_table.py [--demo examples/demo-adapter.safetensors] [--provider cpu]

For the shipped example and for a 4096 -> 4096 adapter of one gated pipe (16x32 grid of
256x128 tiles, top 154 of 512 workers): exports each precision to a temporary folder, runs
``check_parity`` (random normal inputs, seed 0) and prints one markdown table per adapter.
int8-qdq is calibrated on 1024 other random normal rows (seed 1).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.lower import export_onnx
from prism_deploy.parity import check_parity
from prism_deploy.reference import load_adapter, random_adapter
from prism_deploy.runtime.adapter_session import AdapterGraph

VARIANTS = [  # (label, precision, io dtype, calibrator)
    ("fp32", "fp32", "float32", None),
    ("fp16", "fp16", "float32", None),
    ("fp16, io float16", "fp16", "float16", None),
    ("int8", "int8", "float32", None),
    ("int8-qdq, max", "int8-qdq", "float32", "max"),
    ("int8-qdq, percentile", "int8-qdq", "float32", "percentile"),
    ("int4", "int4", "float32", None),  # MatMulNBits / GatherBlockQuantized: ONNX Runtime CPU
]


def table(label: str, adapter, provider: str, samples: int, batch: int, seq: int) -> None:  # type: ignore[no-untyped-def]
    calib = np.random.default_rng(1).standard_normal((1024, adapter.in_dim)).astype(np.float32)
    print(f"\n### {label}\n")
    print(
        "| precision | file size | max abs | rel L2 | cosine | selection match (ambiguous) | "
        "worst tile rel. error | passed |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, precision, io, cal in VARIANTS:
            path = Path(tmp) / "m.onnx"
            res = export_onnx(
                adapter, path, precision=precision, io_dtype=io, calib=calib if cal else None, calibrator=cal or "max"
            )
            rep = check_parity(adapter, AdapterGraph(path, provider), samples=samples, batch=batch, seq=seq, seed=0)
            sel = ", ".join(f"{s['name']} {s['match_fraction']:.4f} ({s['ambiguous']})" for s in rep.selection) or "-"
            worst = max((w["relative"] for w in rep.top_workers), default=0.0)
            print(
                f"| {name} | {res.bytes / 1024:,.0f} KiB | {rep.max_abs:.3g} | {rep.rel_l2:.3g} | "
                f"{rep.cosine:.7f} | {sel} | {worst:.3g} | {'yes' if rep.passed else 'NO'} |",
                flush=True,
            )
    print(f"\n{rep.tokens} tokens ({samples} x [{batch}, {seq}]), provider {provider}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, default=Path("examples/demo-adapter.safetensors"))
    ap.add_argument("--provider", default="cpu")
    args = ap.parse_args()
    table(f"shipped example ({args.demo.name})", load_adapter(args.demo), args.provider, 8, 4, 32)
    big = random_adapter(AdapterConfig(4096, 4096, (PipeSpec("routed", (16, 32), (256, 128), 154),)), seed=0)
    table(
        "4096 -> 4096, 16x32 grid of 256x128 tiles, top 154 of 512 (random_adapter seed 0)",
        big,
        args.provider,
        4,
        4,
        32,
    )


if __name__ == "__main__":
    main()
