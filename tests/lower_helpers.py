"""Shared helpers for the lowering and parity tests: run a model on ORT CPU vs the reference."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from prism_deploy.core.ort_session import make_session
from prism_deploy.reference import PrismAdapter


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = make_session(model.SerializeToString(), "cpu", intra_op_threads=1)
    return sess.run(["adapted"], {"hidden": x})[0]


def rel_l2(y: np.ndarray, ref: np.ndarray) -> float:
    y64, r64 = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    denom = np.linalg.norm(r64)
    return float(np.linalg.norm(y64 - r64) / denom) if denom > 0 else float(np.linalg.norm(y64))


def reference(adapter: PrismAdapter, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return adapter(torch.from_numpy(np.asarray(x, np.float32))).numpy()


def selections_agree(adapter: PrismAdapter, model: onnx.ModelProto, x: np.ndarray) -> bool:
    """True when every gated pipe's TopK in the graph picks the reference's worker sets."""
    from onnx import helper

    meta = next(p.value for p in model.metadata_props if p.key == "prism.lowering")
    import json

    pipes = [p for p in json.loads(meta)["pipes"] if p["gated"]]
    if not pipes:
        return True
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [p["node_prefix"] + "gate/topk_indices" for p in pipes]
    for n in names:
        probe.graph.output.append(helper.make_empty_tensor_value_info(n))
    sess = make_session(probe.SerializeToString(), "cpu", intra_op_threads=1)
    got = sess.run(names, {"hidden": x})
    routings = adapter.routings(torch.from_numpy(np.asarray(x, np.float32)))
    for p, g in zip(pipes, got):
        ref = routings[p["index"]].indices.numpy()
        if not (np.sort(ref, 1) == np.sort(g.reshape(ref.shape), 1)).all():
            return False
    return True
