"""Lowering layer: an adapter as an ONNX graph per precision (docs/onnx-lowering.md).

numpy and onnx only: lowering never needs PyTorch.
"""

from prism_deploy.lower.adapter_onnx import DEFAULT_GATED_FORM, GATED_FORMS, choose_gated_form, pipe_prefixes
from prism_deploy.lower.contract import METADATA_KEY, graph_precision, read_metadata
from prism_deploy.lower.export import IO_DTYPES, ExportResult, build_model, export_onnx

__all__ = [
    "DEFAULT_GATED_FORM",
    "GATED_FORMS",
    "IO_DTYPES",
    "METADATA_KEY",
    "ExportResult",
    "build_model",
    "choose_gated_form",
    "export_onnx",
    "graph_precision",
    "pipe_prefixes",
    "read_metadata",
]
