"""The tracer exports graphs without their weights, which are streamed from the PyTorch tensors
(prism_deploy.models.trace): the files are byte for byte those of the tracer writing its weights
itself, for every role, family and float precision, and for weights kept in a data file."""

from __future__ import annotations

import hashlib

import onnx
import pytest
import torch

from prism_deploy.models import trace
from prism_deploy.models.lm_export import export_model


def _digests(folder, manifest):
    return {key: hashlib.sha256((folder / f["name"]).read_bytes()).hexdigest() for key, f in manifest["files"].items()}


@pytest.fixture
def tracer_writes_weights(monkeypatch):
    """The tracer's own path: no table to read, ``export_params=True``."""
    monkeypatch.setattr(trace, "_exporter_module", lambda: None)


@pytest.mark.parametrize(
    ("kind", "role", "precision"),
    [("llama", "first", "fp32"), ("qwen2", "last", "fp32"), ("gpt2", "middle", "fp32"), ("qwen2", "last", "fp16")],
)
def test_streamed_weights_give_the_tracers_bytes(zoo, tmp_path, request, monkeypatch, kind, role, precision):
    # every weight of these tiny models is under the production threshold: all are withheld here
    monkeypatch.setattr(trace, "SHAPE_INFERENCE_VALUE_BYTES", 0)
    ours = export_model(zoo[kind], role, tmp_path / "ours", precision=precision, max_seq=32, validate=False)
    request.getfixturevalue("tracer_writes_weights")
    theirs = export_model(zoo[kind], role, tmp_path / "theirs", precision=precision, max_seq=32, validate=False)
    assert _digests(tmp_path / "ours", ours) == _digests(tmp_path / "theirs", theirs)
    graph = onnx.load(str(tmp_path / "ours" / ours["files"]["graph"]["name"]), load_external_data=False)
    assert graph.graph.initializer and not {i.name for i in graph.graph.initializer} & {
        i.name for i in graph.graph.input
    }


def test_the_tracer_is_asked_for_no_weights(zoo, tmp_path, monkeypatch):
    calls = []
    real = torch.onnx.export

    def spy(*args, **kwargs):
        calls.append(kwargs.get("export_params", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    export_model(zoo["qwen2"], "last", tmp_path / "m", max_seq=32, validate=False)
    assert calls == [False, False]  # last.onnx and last_with_past.onnx


def test_the_exporters_functions_are_put_back():
    module = trace._exporter_module()
    assert module is not None, "this torch has no _model_to_graph: every export would hold its weights in memory"
    before = module._model_to_graph, torch._C._jit_pass_onnx_graph_shape_type_inference
    with trace.exported_weights() as weights:
        assert weights == {} and module._model_to_graph is not before[0]
        assert torch._C._jit_pass_onnx_graph_shape_type_inference is not before[1]
    assert (module._model_to_graph, torch._C._jit_pass_onnx_graph_shape_type_inference) == before


def test_weights_kept_in_a_data_file_read_back_equal(zoo, tmp_path):
    """A float graph about to be quantized keeps its weights in ``<graph>.data`` (any size)."""
    from prism_deploy.models.hf import load_causal_lm
    from prism_deploy.models.lm_export import _export_first

    model = load_causal_lm(zoo["llama"], attn_implementation="eager", uses_head=False)
    files, written = _export_first(model, tmp_path, 256, external=True)
    assert written == ["first.onnx", "first.onnx.data"]
    inline_dir = tmp_path / "inline"
    inline_dir.mkdir()
    _export_first(model, inline_dir, 256, external=None)
    external = onnx.load(str(tmp_path / "first.onnx"))
    inline = onnx.load(str(inline_dir / "first.onnx"))
    assert [t.name for t in external.graph.initializer] == [t.name for t in inline.graph.initializer]
    for a, b in zip(external.graph.initializer, inline.graph.initializer, strict=True):
        assert onnx.numpy_helper.to_array(a).tobytes() == onnx.numpy_helper.to_array(b).tobytes()
