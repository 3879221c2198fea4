"""ONNX versions and saving, shared by every exporter in the project.

Opset 19 and IR version 9 reach the widest set of consumers: ONNX Runtime 1.18+ (the
``onnxruntime-gpu`` 1.31 wheel refuses IR 14, the newest ``onnx``'s default), and the
TensorRT 10.x/11.x ONNX parsers. Opset 19 is the first where DequantizeLinear takes a
float16 scale (weight-only INT8 with float16 activations).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import onnx

from prism_deploy.core.fsutil import output_path, temp_sibling, write_errors

OPSET = 19
IR_VERSION = 9
# Protobuf cannot serialise a message over 2 GiB: larger models keep weights outside.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2


def finalize(model: onnx.ModelProto, producer: str = "prism-deploy") -> onnx.ModelProto:
    """Pin IR version and opset imports so old and new readers both accept the model."""
    from prism_deploy import __version__

    model.ir_version = IR_VERSION
    model.producer_name = producer
    model.producer_version = __version__
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = OPSET
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], *, external: bool | None = None) -> list[Path]:
    """Save atomically; weights go to ``<name>.data`` beside the model when over ~2 GiB.

    Returns the files written. Both files are written under temporary names and renamed
    only once both are complete, so a failure leaves no half-written model.
    """
    target = output_path(path)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    use_external = weights > EXTERNAL_DATA_THRESHOLD if external is None else external
    # names of this call's own: two saves to one target never write into each other's files
    token = secrets.token_hex(4)
    tmp_model = temp_sibling(target, token)
    data_name = target.name + ".data"
    tmp_data = temp_sibling(target.with_name(data_name), token)
    written: list[Path] = []
    with write_errors(path, tmp_model, tmp_data):
        try:
            if use_external:
                # onnx writes the data file under the location name, relative to the model's folder
                onnx.save_model(
                    model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=tmp_data.name, size_threshold=1024,
                )
                _relocate_external_data(tmp_model, tmp_data.name, data_name)
                os.replace(tmp_data, target.with_name(data_name))
                written.append(target.with_name(data_name))
            else:
                onnx.save_model(model, str(tmp_model))
            os.replace(tmp_model, target)
            written.insert(0, target)
            return written
        finally:
            for leftover in (tmp_model, tmp_data):
                if leftover.exists():
                    leftover.unlink()


def _relocate_external_data(model_path: Path, old: str, new: str) -> None:
    """Point the saved model's external-data entries at the final data file name."""
    m = onnx.load_model(str(model_path), load_external_data=False)
    for tensor in m.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save_model(m, str(model_path))
