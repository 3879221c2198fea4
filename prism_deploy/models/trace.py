"""``torch.onnx.export`` (the TorchScript tracer) with the weights written by this project.

The tracer serializes a graph under 2 GiB in memory: its C++ message with every weight, the
serialized string and the Python ``bytes`` made from it, three copies at once beside the
PyTorch model (a random Llama with 2.0 GB of graph weights peaked at 8.4 GB in that step alone).
Over 2 GiB it writes one file per weight instead, and the two sizes took two paths.

Here every graph takes one path: the tracer exports the graph without its weights
(``export_params=False``: the weights stay graph inputs, a message of a few hundred KB) and
the weights it would have written (the model's parameters and buffers, and the tensors its
constant folding made, such as transposed projection matrices) are taken from the
exporter's own table of them (``_model_to_graph``'s result, read, not changed) and streamed
to disk from the PyTorch tensors by :func:`prism_deploy.core.onnx_io.save_model`. The saved
model is the one ``export_params=True`` writes: same nodes, same initializers in the same
order, same bytes (tests/models/test_trace.py compares them, with every weight's value kept
from the shape inference too). Both hooks are undone when the export returns.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

# Where the TorchScript exporter's ``_model_to_graph`` lives: torch 2.9+ moved it.
_EXPORTER_MODULES = ("torch.onnx._internal.torchscript_exporter.utils", "torch.onnx.utils")


def _exporter_module() -> Any:
    for name in _EXPORTER_MODULES:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(name)
            if callable(getattr(module, "_model_to_graph", None)):
                return module
    return None


# Weights of at least this many bytes are given to the tracer's ONNX shape inference by type and
# shape only. It reads values to infer shapes that depend on them (shape and index tensors, a
# few bytes); given the weights too it copied them, 1.0 GB at once for a 2 GB graph.
SHAPE_INFERENCE_VALUE_BYTES = 1 << 20


@contextlib.contextmanager
def exported_weights() -> Iterator[dict[str, torch.Tensor] | None]:
    """While open, the tensors the next ``torch.onnx.export(..., dynamo=False)`` traces (by the
    names its graph gives them) are collected into the dict yielded, and its shape inference is
    not given the large ones' values; ``None`` where this torch has no ``_model_to_graph`` to
    read them from (the caller then exports with its weights)."""
    module = _exporter_module()
    infer = getattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", None)
    if module is None or infer is None:
        yield None
        return
    original = module._model_to_graph
    weights: dict[str, torch.Tensor] = {}

    def reading(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        weights.update(result[1])  # (graph, params_dict, torch_out)
        return result

    def inferring(graph: Any, params: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        small = {n: t for n, t in params.items() if t.numel() * t.element_size() < SHAPE_INFERENCE_VALUE_BYTES}
        return infer(graph, small, *args, **kwargs)

    module._model_to_graph = reading
    torch._C._jit_pass_onnx_graph_shape_type_inference = inferring  # type: ignore[assignment]
    try:
        yield weights
    finally:
        module._model_to_graph = original
        torch._C._jit_pass_onnx_graph_shape_type_inference = infer


def attach_weights(model: Any, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Turn the graph inputs of ``model`` (exported with ``export_params=False``) that name a
    traced weight into initializers, as the exporter writes them: dims and type set, bytes
    deferred. Returns ``{name: DeferredTensor}`` for :func:`~prism_deploy.core.onnx_io.save_model`
    (0-d tensors are written inline here)."""
    from onnx import helper

    from prism_deploy.core.blocks import DeferredTensor

    graph = model.graph
    inputs = list(graph.input)
    taken = [i for i in inputs if i.name in weights]
    deferred: dict[str, Any] = {}
    for value in taken:
        tensor = weights[value.name].detach()
        if tensor.dtype == torch.bfloat16:
            raise ValueError(f"{value.name}: bfloat16 weights are traced as float16 or float32 here")
        dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
        init = graph.initializer.add()
        init.name = value.name
        init.data_type = helper.np_dtype_to_tensor_dtype(dtype)
        init.dims.extend(int(d) for d in tensor.shape)
        if tensor.dim() == 0:
            init.raw_data = tensor.cpu().numpy().tobytes()
            continue
        # a view of the tensor's memory (strided for a folded transpose): rows are copied as written
        deferred[value.name] = DeferredTensor.of_array(tensor.cpu().numpy())
    del graph.input[:]
    graph.input.extend(i for i in inputs if i.name not in weights)
    return deferred
