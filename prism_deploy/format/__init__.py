"""Format layer: every file the project reads and writes, validated on the way in.

- the v1 adapter file (``adapter_file``, ``adapter_config``; the seed's ``.pt`` import in ``convert``);
- the model folder ``export-model`` writes (``model_folder``: ``model.json``, roles, graphs);
- the build folder's ``manifest.json`` (``engine_manifest``).

Plain numpy and JSON: nothing here imports PyTorch (``convert`` does, lazily, to read a seed
pickle).
"""

from prism_deploy.format.adapter_config import FORMAT_NAME, FORMAT_VERSION, AdapterConfig, PipeSpec
from prism_deploy.format.adapter_file import (
    FLOAT_DTYPES,
    AdapterTensors,
    adapter_arrays,
    describe,
    file_sha256,
    read_adapter_config,
    read_adapter_file,
    validate_tensors,
    write_adapter_file,
)

__all__ = [
    "FLOAT_DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "AdapterConfig",
    "AdapterTensors",
    "PipeSpec",
    "adapter_arrays",
    "describe",
    "file_sha256",
    "read_adapter_config",
    "read_adapter_file",
    "validate_tensors",
    "write_adapter_file",
]
