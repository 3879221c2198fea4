"""The stage I/O contract (prism_deploy.format.stage_io) and the descriptions read from it:
model.json's ``io`` record, the role names the runtime feeds, the Triton stage and decode specs."""

from __future__ import annotations

from prism_deploy.core import onnx_io
from prism_deploy.format import model_folder
from prism_deploy.format.stage_io import KINDS, input_names, output_name
from prism_deploy.serving.stage_runtime import TensorSpec, _decode_io, _model_io

MODEL = {"dims": {"hidden": 8, "vocab": 11, "layers": 2, "kv_heads": 3, "head_dim": 4}}


def test_names_by_kind():
    assert KINDS == ("first", "adapter", "middle", "last")
    assert [input_names(k) for k in KINDS] == [
        ("input_ids", "attention_mask"),
        ("hidden",),
        ("inputs_embeds", "attention_mask"),
        ("inputs_embeds", "attention_mask"),
    ]
    assert [output_name(k) for k in KINDS] == ["hidden", "adapted", "hidden", "logits"]
    assert (input_names("adapter"), output_name("adapter")) == ((onnx_io.INPUT_NAME,), onnx_io.OUTPUT_NAME)
    assert model_folder.INPUT == {"first": "input_ids", "middle": "inputs_embeds", "last": "inputs_embeds"}
    assert model_folder.OUTPUT == {"first": "hidden", "middle": "hidden", "last": "logits"}


def test_model_json_io_record():
    assert model_folder.io_description("first", 1) == {
        "inputs": {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]},
        "outputs": {"hidden": ["batch", "seq", "hidden"]},
    }
    last = model_folder.io_description("last", 1)
    assert last["outputs"] == {"logits": ["batch", "seq", "vocab"]}
    assert last["with_past"] == {
        "inputs": {
            "inputs_embeds": ["batch", "seq", "hidden"],
            "attention_mask": ["batch", "total_seq"],
            "past_key_values.0.key": ["batch", "kv_heads", "past_seq", "head_dim"],
            "past_key_values.0.value": ["batch", "kv_heads", "past_seq", "head_dim"],
        },
        "outputs": {
            "logits": ["batch", "seq", "vocab"],
            "present.0.key": ["batch", "kv_heads", "total_seq", "head_dim"],
            "present.0.value": ["batch", "kv_heads", "total_seq", "head_dim"],
        },
        "optional_inputs": {"logits_start": [1]},
    }  # the positions whose logits it computes (default: all)


def test_triton_specs_size_the_widths_and_leave_out_the_batch():
    assert _model_io("first", MODEL) == (
        [TensorSpec("input_ids", "int64", [-1]), TensorSpec("attention_mask", "int64", [-1])],
        [TensorSpec("hidden", "float32", [-1, 8])],
    )
    assert _model_io("last", MODEL) == (
        [TensorSpec("inputs_embeds", "float32", [-1, 8]), TensorSpec("attention_mask", "int64", [-1])],
        [TensorSpec("logits", "float32", [-1, 11])],
    )
    inputs, outputs = _decode_io(MODEL)  # not batched by Triton: the batch dim is explicit
    assert inputs[:2] == [
        TensorSpec("inputs_embeds", "float32", [-1, -1, 8]),
        TensorSpec("attention_mask", "int64", [-1, -1]),
    ]
    assert [t.name for t in inputs[2:]] == model_folder.past_names(2)
    assert all(t.dims == [-1, 3, -1, 4] and t.dtype == "float32" for t in inputs[2:] + outputs[1:])
    assert outputs[0] == TensorSpec("logits", "float32", [-1, 11])  # the last position only
    assert [t.name for t in outputs[1:]] == model_folder.past_names(2, "present")
