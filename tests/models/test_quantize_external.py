"""Quantizing a graph whose float weights live in an external data file, from another folder.

Model L's int8 export (2048-wide norms, every tensor external) failed here: the checker ran on
the in-memory graph, whose kept float tensors (the norms) still point at the source's data
file by a relative name, and ONNX resolves that against the working directory."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from prism_deploy.core.onnx_io import check_graph
from prism_deploy.models import quantize


def _external_graph(folder, width=64):
    """x @ W + b, W and b both in ``g.onnx.data`` (b is kept float by the quantizer)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((width, width)).astype(np.float32)
    b = rng.standard_normal(width).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"], name="proj"), helper.make_node("Add", ["xw", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    path = folder / "g.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    return path, w, b


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_graph_with_external_float_tensors_quantizes_from_any_folder(tmp_path, monkeypatch, precision):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src, w, b = _external_graph(src_dir)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory holds no g.onnx.data
    dst = tmp_path / "out" / "q.onnx"
    dst.parent.mkdir()
    record = quantize.quantize_graph(src, dst, quantize.make_spec(precision))
    assert [layer["quantized"] for layer in record["layers"] if "quantized" in layer] == ["MatMulNBits"]
    x = np.random.default_rng(1).standard_normal((1, w.shape[0])).astype(np.float32)
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x @ w + b
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < (0.02 if precision == "int8" else 0.2)


def test_check_graph_still_finds_a_broken_graph(tmp_path):
    """Leaving the weights out does not leave the structure unchecked."""
    src, _, _ = _external_graph(tmp_path)
    model = onnx.load(str(src), load_external_data=False)
    check_graph(model)  # the graph as written passes without its data file being read
    model.graph.node[1].input[0] = "missing"
    with pytest.raises(onnx.checker.ValidationError):
        check_graph(model)
