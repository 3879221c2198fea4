"""The lowering's metadata contract: what an exported adapter graph says about itself.

``export`` writes one JSON object into the model's ``metadata_props["prism.lowering"]``: the
precision, io and compute dtypes, dims, the gated form, the name of ``hidden_2d`` (the input
reshaped to ``[T, in_dim]`` in the compute dtype), and per pipe its node prefix and the names
of its ``scores``, ``output``, ``tiles``, ``scales`` and ``dense_weight`` tensors. The fusion
pass (``prism_deploy.fuse``) rewrites graphs by these names and the runtime reads the
precision and the stored tiles through them; this module is the one reader and writer.
"""

from __future__ import annotations

import json
from typing import Any

import onnx

from prism_deploy.core import jsontext
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.precision import Precision

METADATA_KEY = "prism.lowering"
METADATA_VERSION = 1
# Keys every contract has, and keys a gated pipe's entry must fill (what fuse rewrites by).
REQUIRED = ("precision", "io_dtype", "hidden_2d", "pipes", "in_dim", "out_dim")
GATED_PIPE_KEYS = (
    "index",
    "name",
    "R",
    "C",
    "tr",
    "tc",
    "top_k",
    "gate_scale",
    "scores",
    "output",
    "tiles",
    "node_prefix",
)


def write_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = json.dumps({"version": METADATA_VERSION, **meta}, sort_keys=True)
    onnx.helper.set_model_props(model, props)


def has_metadata(model: onnx.ModelProto) -> bool:
    return any(p.key == METADATA_KEY for p in model.metadata_props)


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """The contract of a graph ``export`` wrote, checked for what its readers use."""
    raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if raw is None:
        raise PrismInputError(f"the model has no {METADATA_KEY!r} metadata: not written by prism-deploy export")
    meta = jsontext.loads(raw, f"metadata {METADATA_KEY!r}")
    if not isinstance(meta, dict) or meta.get("version") != METADATA_VERSION:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise PrismInputError(f"metadata {METADATA_KEY!r} version {version!r} is not {METADATA_VERSION}")
    for key in REQUIRED:
        if key not in meta:
            raise PrismInputError(f"metadata {METADATA_KEY!r} lacks {key!r}")
    meta["precision"] = Precision.parse(meta["precision"], f"metadata {METADATA_KEY!r} precision")
    if not isinstance(meta["pipes"], list) or not all(isinstance(p, dict) for p in meta["pipes"]):
        raise PrismInputError(f"metadata {METADATA_KEY!r}: pipes must be a list of objects")
    for pipe in meta["pipes"]:
        if pipe.get("gated"):
            missing = [k for k in GATED_PIPE_KEYS if pipe.get(k) is None]
            if missing:
                raise PrismInputError(f"metadata of gated pipe {pipe.get('index')} lacks {', '.join(missing)}")
    return meta


def graph_precision(model: onnx.ModelProto) -> Precision:
    """The precision of an adapter graph: what its contract says (``int8-qdq`` included), else
    (a graph from elsewhere) the least precise weights it stores."""
    if has_metadata(model):
        parsed: Precision = read_metadata(model)["precision"]  # parsed when the contract was read
        return parsed
    types = {t.data_type for t in model.graph.initializer}
    if types & {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4}:
        return Precision.INT8
    if types & {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}:
        return Precision.FP16
    return Precision.FP32
