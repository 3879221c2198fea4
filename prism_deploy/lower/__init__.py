"""Lowering layer: a ``PrismAdapter`` as an ONNX graph per precision (docs/onnx-lowering.md)."""

from prism_deploy.lower.export import (
    DEFAULT_GATED_FORM,
    GATED_FORMS,
    IO_DTYPES,
    METADATA_KEY,
    PRECISIONS,
    ExportResult,
    build_model,
    export_onnx,
    read_lowering_metadata,
)

__all__ = [
    "DEFAULT_GATED_FORM",
    "GATED_FORMS",
    "IO_DTYPES",
    "METADATA_KEY",
    "PRECISIONS",
    "ExportResult",
    "build_model",
    "export_onnx",
    "read_lowering_metadata",
]
