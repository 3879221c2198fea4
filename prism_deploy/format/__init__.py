"""Format layer: the v1 adapter file (load, validate, save) and its config."""

from prism_deploy.format.adapter_file import (
    AdapterTensors,
    file_sha256,
    read_adapter_file,
    validate_tensors,
    write_adapter_file,
)
from prism_deploy.format.config import FORMAT_NAME, FORMAT_VERSION, AdapterConfig, PipeSpec

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "AdapterConfig",
    "AdapterTensors",
    "PipeSpec",
    "file_sha256",
    "read_adapter_file",
    "validate_tensors",
    "write_adapter_file",
]
