"""A small helper for writing ONNX graphs by hand: named nodes, constants, initializers.

Every node and tensor gets an explicit, readable name (the plugin fusion pass and people
reading the graph in Netron find a pipe's nodes by their prefix), and each helper returns
the name of the tensor it produced so that lowering code reads like the math it builds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from prism_deploy.core.blocks import DeferredTensor

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int64): TensorProto.INT64,
}
DTYPE_NAMES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


class GraphBuilder:
    """Writes nodes and initializers straight into one ``ModelProto``; names are unique and
    chosen by the caller.

    The weights are copied exactly once, into ``model.graph.initializer``: building a list
    of TensorProtos and handing it to ``helper.make_graph`` / ``make_model`` would copy each
    of them twice more (``extend`` and ``CopyFrom`` copy messages), which for a multi-GB
    adapter means three extra copies of the weights in memory instead of one.

    Large weights are better not copied at all: an initializer given as a ``DeferredTensor``
    enters the model as its name, type and shape only, and is kept in ``deferred`` for
    ``save_model``, which computes and writes it a block at a time. ``materialize()`` fills
    them in instead, for a model wanted whole in memory (the same bytes either way).
    """

    def __init__(self) -> None:
        self.model = onnx.ModelProto()
        self.graph = self.model.graph
        self._names: set[str] = set()
        self.deferred: dict[str, DeferredTensor] = {}

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate tensor or node name {name!r} in the graph")
        self._names.add(name)
        return name

    def op(
        self, op_type: str, inputs: Sequence[str], name: str, *, outputs: int | Sequence[str] = 1, **attrs: Any
    ) -> Any:
        """Add node ``name``; its outputs are ``name`` (one) or ``name:i`` / given names."""
        if isinstance(outputs, int):
            outs = [name] if outputs == 1 else [f"{name}:{i}" for i in range(outputs)]
        else:
            outs = list(outputs)
        for o in outs:
            self._claim(o)
        self.graph.node.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def initializer(self, name: str, array: np.ndarray | DeferredTensor) -> str:
        """An initializer from ``array``: its bytes are copied once, into the model (or, for a
        ``DeferredTensor``, not yet: see the class)."""
        self._claim(name)
        if not isinstance(array, DeferredTensor):
            array = np.ascontiguousarray(array)
        dtype = np.dtype(array.dtype)
        if dtype not in NP_TO_ONNX:
            raise TypeError(f"initializer {name!r}: unsupported dtype {dtype}")
        t = self.graph.initializer.add()
        t.name = name
        t.data_type = NP_TO_ONNX[dtype]
        t.dims.extend(array.shape)
        if isinstance(array, DeferredTensor):
            self.deferred[name] = array
        else:
            # protobuf takes only bytes: one transient copy of this tensor, freed on return
            t.raw_data = array.tobytes()
        return name

    def materialize(self) -> None:
        """Put every deferred initializer's bytes into the model (one tensor at a time)."""
        for t in self.graph.initializer:
            if t.name in self.deferred:
                t.raw_data = self.deferred.pop(t.name).materialize().tobytes()

    def const(self, name: str, value: Any, dtype: np.dtype | type) -> str:
        return self.initializer(name, np.asarray(value, dtype=dtype))

    def ints(self, name: str, values: Sequence[int]) -> str:
        return self.initializer(name, np.asarray(list(values), dtype=np.int64))
