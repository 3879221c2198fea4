"""The ONNX Runtime twin of ``prism::tile_dispatch``: a numpy implementation registered with
``onnxruntime-extensions``, so that a fused graph runs on ONNX Runtime CPU and CI can check the
rewrite end to end against the reference (every input, attribute and output must be wired
right for the numbers to match).

``onnxruntime-extensions`` Python ops take one fixed input signature, and float16 inputs abort
the process (see /work/shared/TENSORRT.md). So the op is declared all-float32, and
``twin_model`` wraps every ``tile_dispatch`` node of a fused model in Casts: inputs to float32
(int8 tiles are integers, exact in float32), the output back to its dtype. The twin applies
``scales`` whenever they hold one value per tile row (int8 tiles); a one-element ``scales``
(float tiles) is the unit scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from prism_deploy.fuse.gated_pipes import DOMAIN, OP_TYPE
from prism_deploy.kernel.semantics import tile_dispatch

_registered = False


def register_twin() -> str:
    """Register the Python op (once per process); returns the extensions library path."""
    global _registered
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    if not _registered:
        f = PyCustomOpDef.dt_float
        i = PyCustomOpDef.dt_int64

        @onnx_op(op_type=f"{DOMAIN}::{OP_TYPE}", inputs=[f, f, f, f], outputs=[f],
                 attrs={"R": i, "C": i, "tr": i, "tc": i, "top_k": i, "gate_scale": f, "out_dim": i})
        def _tile_dispatch_twin(hidden: np.ndarray, scores: np.ndarray, tiles: np.ndarray, scales: np.ndarray,
                                **attrs: Any) -> np.ndarray:
            return tile_dispatch_twin(hidden, scores, tiles, scales, **attrs)

        _registered = True
    return str(get_library_path())


def tile_dispatch_twin(hidden: np.ndarray, scores: np.ndarray, tiles: np.ndarray, scales: np.ndarray,
                       **attrs: Any) -> np.ndarray:
    R, C, tr, tc = (int(attrs[k]) for k in ("R", "C", "tr", "tc"))
    W = R * C
    t = np.asarray(tiles, dtype=np.float32).reshape(W, tr, tc)
    s = np.asarray(scales, dtype=np.float32)
    if s.size == W * tr:
        t = t * s.reshape(W, tr, 1)
    elif s.size != 1:
        raise ValueError(f"tile_dispatch: scales has {s.size} elements, expected 1 or R*C*tr={W * tr}")
    return tile_dispatch(
        hidden, scores, t, None, R=R, C=C, tr=tr, tc=tc, top_k=int(attrs["top_k"]),
        gate_scale=float(attrs["gate_scale"]), out_dim=int(attrs["out_dim"]),
    )


def twin_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a fused model whose ``tile_dispatch`` nodes see float32 only (Casts around them)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(out)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in out.graph.initializer})
    nodes = []
    for node in out.graph.node:
        if node.op_type != OP_TYPE or node.domain != DOMAIN:
            nodes.append(node)
            continue
        for k, name in enumerate(list(node.input)):
            if types.get(name, TensorProto.FLOAT) != TensorProto.FLOAT:
                cast = f"{node.name}/twin_in{k}"
                nodes.append(helper.make_node("Cast", [name], [cast], name=cast, to=TensorProto.FLOAT))
                node.input[k] = cast
        out_type = _original_input_type(model, types, node)
        nodes.append(node)
        if out_type != TensorProto.FLOAT:
            final = node.output[0]
            tmp = f"{node.name}/twin_out"
            node.output[0] = tmp
            nodes.append(helper.make_node("Cast", [tmp], [final], name=f"{node.name}/twin_out_cast", to=out_type))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _original_input_type(model: onnx.ModelProto, types: dict[str, int], node: onnx.NodeProto) -> int:
    """The output dtype of the op: that of its ``hidden`` input in the original model."""
    for n in model.graph.node:
        if n.name == node.name:
            return types.get(n.input[0], TensorProto.FLOAT)
    return TensorProto.FLOAT


def make_twin_session(model: onnx.ModelProto, intra_op_threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session running a fused model with the twin op."""
    from prism_deploy.runtime.ort_session import make_session

    library = register_twin()
    return make_session(twin_model(model).SerializeToString(), "cpu", custom_ops_library=library,
                        intra_op_threads=intra_op_threads)
