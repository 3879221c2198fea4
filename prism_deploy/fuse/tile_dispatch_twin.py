"""The ONNX Runtime twin of ``prism::tile_dispatch``: a numpy implementation registered with
``onnxruntime-extensions``, so that a fused graph runs on ONNX Runtime CPU and CI can check the
rewrite end to end against the reference (every input, attribute and output must be wired
right for the numbers to match).

``onnxruntime-extensions`` Python ops take one fixed input signature, and float16 inputs abort
the process. So the op is declared all-float32, and
``twin_model`` wraps every ``tile_dispatch`` node of a fused model in Casts: inputs to float32
(int8 tiles are integers, exact in float32), the output back to its dtype. The twin applies
``scales`` whenever they hold one value per tile row (int8 tiles); a one-element ``scales``
(float tiles) is the unit scale.

Two implementations of the op, chosen per model by ``twin_model(model, kernel=...)``:
``"semantics"`` (numpy, the reference semantics; the default) and ``"host"``: the CUDA kernel's
own source run on the CPU (``prism_deploy.kernel.host``), so a fused graph can be checked end to
end with the kernel code itself computing its ``tile_dispatch`` nodes. The float32 the op sees
loses nothing: float16 activations and tiles widen exactly (the kernel widens them too, and
the Cast after the node rounds the float32 result to float16 as the kernel's own output
conversion would), and int8 tiles stay integers, handed to the kernel as int8 again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from prism_deploy.core.errors import PrismInputError
from prism_deploy.fuse.gated_pipes import DOMAIN, OP_TYPE
from prism_deploy.kernel.semantics import tile_dispatch

# op type of each implementation inside a twin model (the fused model itself keeps OP_TYPE)
TWIN_OP_TYPES = {"semantics": OP_TYPE, "host": f"{OP_TYPE}_host"}
_registered = False


def register_twin() -> str:
    """Register the Python op (once per process); returns the extensions library path."""
    global _registered
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    if not _registered:
        f = PyCustomOpDef.dt_float
        i = PyCustomOpDef.dt_int64

        @onnx_op(
            op_type=f"{DOMAIN}::{OP_TYPE}",
            inputs=[f, f, f, f],
            outputs=[f],
            attrs={"R": i, "C": i, "tr": i, "tc": i, "top_k": i, "gate_scale": f, "out_dim": i},
        )
        def _tile_dispatch_twin(
            hidden: np.ndarray, scores: np.ndarray, tiles: np.ndarray, scales: np.ndarray, **attrs: Any
        ) -> np.ndarray:
            return tile_dispatch_twin(hidden, scores, tiles, scales, **attrs)

        @onnx_op(
            op_type=f"{DOMAIN}::{TWIN_OP_TYPES['host']}",
            inputs=[f, f, f, f],
            outputs=[f],
            attrs={"R": i, "C": i, "tr": i, "tc": i, "top_k": i, "gate_scale": f, "out_dim": i},
        )
        def _tile_dispatch_host(
            hidden: np.ndarray, scores: np.ndarray, tiles: np.ndarray, scales: np.ndarray, **attrs: Any
        ) -> np.ndarray:
            return tile_dispatch_host_twin(hidden, scores, tiles, scales, **attrs)

        _registered = True
    return str(get_library_path())


def tile_dispatch_twin(
    hidden: np.ndarray, scores: np.ndarray, tiles: np.ndarray, scales: np.ndarray, **attrs: Any
) -> np.ndarray:
    R, C, tr, tc = (int(attrs[k]) for k in ("R", "C", "tr", "tc"))
    W = R * C
    t = np.asarray(tiles, dtype=np.float32).reshape(W, tr, tc)
    s = np.asarray(scales, dtype=np.float32)
    if s.size == W * tr:
        t = t * s.reshape(W, tr, 1)
    elif s.size != 1:
        raise ValueError(f"tile_dispatch: scales has {s.size} elements, expected 1 or R*C*tr={W * tr}")
    return tile_dispatch(
        hidden,
        scores,
        t,
        None,
        R=R,
        C=C,
        tr=tr,
        tc=tc,
        top_k=int(attrs["top_k"]),
        gate_scale=float(attrs["gate_scale"]),
        out_dim=int(attrs["out_dim"]),
    )


def tile_dispatch_host_twin(
    hidden: np.ndarray, scores: np.ndarray, tiles: np.ndarray, scales: np.ndarray, **attrs: Any
) -> np.ndarray:
    """The op computed by the kernel's CUDA source on the CPU (see the module docstring)."""
    from prism_deploy.kernel.host import run_on_host
    from prism_deploy.kernel.spec import TileDispatchSpec

    R, C, tr, tc = (int(attrs[k]) for k in ("R", "C", "tr", "tc"))
    W = R * C
    s = np.asarray(scales, dtype=np.float32)
    int8 = s.size == W * tr and s.size != 1
    spec = TileDispatchSpec(
        R,
        C,
        tr,
        tc,
        int(attrs["top_k"]),
        float(attrs["gate_scale"]),
        int(attrs["out_dim"]),
        "float32",
        "int8" if int8 else "float32",
    )
    t = np.asarray(tiles, dtype=np.float32).reshape(W, tr, tc)
    if int8:
        t = t.astype(np.int8)  # integers in float32: exact both ways
    hidden = np.ascontiguousarray(hidden, dtype=np.float32)
    if hidden.shape[0] == 0:
        return np.zeros((0, spec.out_dim), np.float32)
    return run_on_host(spec, hidden, np.asarray(scores, dtype=np.float32), t, s.reshape(W, tr) if int8 else None)


def twin_model(model: onnx.ModelProto, kernel: str = "semantics") -> onnx.ModelProto:
    """A copy of a fused model whose ``tile_dispatch`` nodes see float32 only (Casts around them),
    computed by ``kernel``: ``"semantics"`` (numpy) or ``"host"`` (the kernel source on the CPU)."""
    if kernel not in TWIN_OP_TYPES:
        raise PrismInputError(f"twin kernel must be one of {sorted(TWIN_OP_TYPES)}, got {kernel!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(out)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    }
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
        node.op_type = TWIN_OP_TYPES[kernel]
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


def make_twin_session(
    model: onnx.ModelProto,
    intra_op_threads: int | None = None,
    *,
    kernel: str = "semantics",
    session_config: dict[str, str] | None = None,
) -> Any:
    """An ONNX Runtime CPU session running a fused model with the twin op (``kernel``: see
    ``twin_model``)."""
    from prism_deploy.core.ort_session import make_session

    library = register_twin()
    if kernel == "host":
        _build_host_runners(model)
    return make_session(
        twin_model(model, kernel).SerializeToString(),
        "cpu",
        custom_ops_library=library,
        intra_op_threads=intra_op_threads,
        session_config=session_config,
    )


def _build_host_runners(model: onnx.ModelProto) -> None:
    """Compile the host kernel of every ``tile_dispatch`` node now: an exception inside a
    Python op aborts the process (onnxruntime-extensions), so a missing compiler or a build
    error must surface here, as an exception, before ONNX Runtime runs anything."""
    from prism_deploy.kernel.host import build_host_runner
    from prism_deploy.kernel.spec import TileDispatchSpec

    int8 = {t.name for t in model.graph.initializer if t.data_type == TensorProto.INT8}
    for node in model.graph.node:
        if node.op_type != OP_TYPE or node.domain != DOMAIN:
            continue
        a = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        build_host_runner(
            TileDispatchSpec(
                int(a["R"]),
                int(a["C"]),
                int(a["tr"]),
                int(a["tc"]),
                int(a["top_k"]),
                float(a["gate_scale"]),
                int(a["out_dim"]),
                "float32",
                "int8" if node.input[2] in int8 else "float32",
            )
        )
