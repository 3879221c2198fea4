"""How often float16 gate scores change TopK's selection, against float32 scores.

    python tools/measure_fp16_gate.py [--tokens 4096]

For each adapter, runs the fp16 graph twice on ONNX Runtime CPU (gate scores in float32, as
exported, and in float16) and counts the tokens whose selected worker set differs from the
float64 reference's. Both graphs take float32 input. The figures in docs/onnx-lowering.md
come from this script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from prism_deploy.core.ort_session import make_session
from prism_deploy.core.precision import Precision
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.lower.adapter_onnx import AdapterGraphBuilder
from prism_deploy.reference import load_adapter, random_adapter

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo-adapter.safetensors"


def selections(model: onnx.ModelProto, x: np.ndarray) -> dict[int, np.ndarray]:
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == "prism.lowering"))
    gated = [p for p in meta["pipes"] if p["gated"]]
    names = [p["node_prefix"] + "gate/topk_indices" for p in gated]
    for n in names:
        model.graph.output.append(helper.make_empty_tensor_value_info(n))
    sess = make_session(model.SerializeToString(), "cpu")
    return {p["index"]: np.sort(r, axis=1) for p, r in zip(gated, sess.run(names, {"hidden": x[None]}))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--demo", type=Path, default=DEMO, help="the shipped example adapter")
    args = ap.parse_args()
    cases = {
        "4096->4096 16x32 of 256x128 top 154": random_adapter(
            AdapterConfig(4096, 4096, (PipeSpec("routed", (16, 32), (256, 128), 154),)), seed=0
        ),
        "1024->1024 8x8 of 128x128 top 16": random_adapter(
            AdapterConfig(1024, 1024, (PipeSpec("routed", (8, 8), (128, 128), 16),)), seed=0
        ),
    }
    if args.demo.exists():
        cases["demo adapter (examples/demo-adapter.safetensors)"] = load_adapter(args.demo)
    rng = np.random.default_rng(0)
    for label, adapter in cases.items():
        x = rng.standard_normal((args.tokens, adapter.in_dim)).astype(np.float32)
        ref = {
            i: np.sort(r.indices.numpy(), axis=1)
            for i, r in enumerate(adapter.routings(torch.from_numpy(x).double()))
            if r is not None
        }
        # float32 reference (torch) as the yardstick of float32 rounding itself
        ref32 = {
            i: np.sort(r.indices.numpy(), axis=1)
            for i, r in enumerate(adapter.routings(torch.from_numpy(x)))
            if r is not None
        }
        got = {
            gd: selections(
                AdapterGraphBuilder(adapter.arrays(), Precision.FP16, "float32", "auto", gate_dtype=gd).model(), x
            )
            for gd in ("float32", "float16")
        }
        for i in ref:

            def flips(sel: np.ndarray) -> int:
                return int((~(sel == ref[i]).all(axis=1)).sum())

            print(
                f"{label:48s} pipe {adapter.config.pipes[i].name:7s} tokens {args.tokens}: sets differing from "
                f"float64: torch f32 {flips(ref32[i])}, graph f32 gate {flips(got['float32'][i])}, "
                f"graph f16 gate {flips(got['float16'][i])}",
                flush=True,
            )


if __name__ == "__main__":
    main()
