"""A last model's KV-cache graph computes logits only at the positions its caller reads.

Generation reads each row's last position only; the parity check and the perplexity and
quality reports read every position. One graph serves both (one set of weights in memory,
docs/model-forms.md), so which positions go through the LM head is chosen per call: the
hidden state is sliced on the sequence axis before the head, from ``logits_start``
(:data:`prism_deploy.format.model_folder.LOGITS_START`, ``[1]`` int64).

``logits_start`` is an initializer that is also a graph input (ONNX's overridable
initializer): its default 0 keeps every position, so callers that do not feed it get the
graph they had; the runtime's generation feeds -1 and the prefill multiplies one position
by the ``[hidden, vocab]`` head instead of the whole prompt. Why not a second output
(``last_logits``): ONNX Runtime 1.31 runs every node of the graph whatever outputs a call
asks for (measured with its profiler, docs/model-forms.md, "Prefill logits"), so the full
head would still run. ONNX Runtime's ``get_inputs`` (and so Triton's configs) does not list
an overridable initializer, and TensorRT's parser imports it as a weight (the default): the
portable form stays what TensorRT parses.

The edit is made on the written graph, after quantization, in both forms (the tracer's
``MatMul`` head or the ``MatMulNBits`` one; ONNX Runtime GenAI's builder's graph likewise),
without loading external weights.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from prism_deploy.core.errors import CheckFailed
from prism_deploy.format.model_folder import LOGITS_START

HEAD_OPS = ("MatMul", "MatMulNBits")
_INT64_MAX = 2**63 - 1


def add_logits_start(path: str | os.PathLike[str], output: str = "logits") -> None:
    """Give the graph at ``path`` the optional ``logits_start`` input, slicing the LM head's
    input (the node that writes ``output``); rewritten in place, external data untouched."""
    import onnx

    from prism_deploy.core.fsutil import atomic_output

    model = onnx.load(str(path), load_external_data=False)
    if add_logits_start_to(model, str(path), output):
        with atomic_output(path) as tmp:
            onnx.save_model(model, str(tmp))


def add_logits_start_to(model: Any, where: str, output: str = "logits") -> bool:
    """:func:`add_logits_start` on a loaded ``model`` (``where`` names it in errors); False when
    it has the input already. An export applies it before its graph is first saved, so that a
    graph whose weights are inline is not parsed and written again for it."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if any(t.name == LOGITS_START for t in graph.initializer):
        return False
    heads = [n for n in graph.node if output in n.output]
    if len(heads) != 1 or heads[0].op_type not in HEAD_OPS:
        found = heads[0].op_type if heads else "no node"
        raise CheckFailed(
            f"{where}: `{output}` is written by {found}, not an LM head ({' or '.join(HEAD_OPS)}): "
            f"cannot add {LOGITS_START}"
        )
    head = heads[0]
    at = list(graph.node).index(head)
    ends, axes, sliced = f"/{LOGITS_START}/ends", f"/{LOGITS_START}/axes", f"/{LOGITS_START}/hidden"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), LOGITS_START),
            numpy_helper.from_array(np.array([_INT64_MAX], np.int64), ends),
            numpy_helper.from_array(np.array([1], np.int64), axes),
        ]
    )
    graph.input.append(helper.make_tensor_value_info(LOGITS_START, TensorProto.INT64, [1]))
    graph.node.insert(
        at,
        helper.make_node("Slice", [head.input[0], LOGITS_START, ends, axes], [sliced], name=f"/{LOGITS_START}/Slice"),
    )
    head.input[0] = sliced
    for value in graph.output:  # the positions it gives are no longer the input's
        if value.name == output and len(value.type.tensor_type.shape.dim) == 3:
            value.type.tensor_type.shape.dim[1].dim_param = "logits_seq"
    return True
