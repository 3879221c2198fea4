"""Reading and writing ``adapter.safetensors`` files of format v1.

The safetensors library parses the container; this module checks what format v1 adds on
top (metadata, config, tensor names, shapes, dtypes, finiteness) and turns every failure
into one ``AdapterFormatError`` line that names the file and the key or tensor at fault.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prism_deploy.errors import AdapterFormatError
from prism_deploy.format.config import FORMAT_NAME, FORMAT_VERSION, AdapterConfig
from prism_deploy.fsutil import atomic_output, file_sha256

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class AdapterTensors:
    """A validated adapter: its config and its tensors, in the stored dtypes."""

    config: AdapterConfig
    tensors: dict[str, torch.Tensor]


def read_adapter_file(path: str | os.PathLike[str]) -> AdapterTensors:
    """Load and fully validate a v1 adapter file."""
    p = Path(path)
    if not p.exists():
        raise AdapterFormatError(f"{p}: no such file")
    if not p.is_file():
        raise AdapterFormatError(f"{p}: not a file")
    try:
        with safe_open(str(p), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except AdapterFormatError:
        raise
    except Exception as exc:  # the container parser's own errors, whatever their type
        raise AdapterFormatError(f"{p}: not a valid safetensors file ({_one_line(exc)})") from None
    try:
        config = config_from_metadata(metadata)
        validate_tensors(config, tensors)
    except AdapterFormatError as exc:
        raise AdapterFormatError(f"{p}: {exc}") from None
    return AdapterTensors(config, tensors)


def config_from_metadata(metadata: Mapping[str, str]) -> AdapterConfig:
    fmt = metadata.get("format")
    if fmt != FORMAT_NAME:
        raise AdapterFormatError(f"metadata.format: expected {FORMAT_NAME!r}, got {fmt!r}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterFormatError(
            f"metadata.format_version: unsupported {version!r} (this tool reads {FORMAT_VERSION!r})"
        )
    if "config" not in metadata:
        raise AdapterFormatError("metadata.config: missing")
    return AdapterConfig.loads(metadata["config"])


def validate_tensors(config: AdapterConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    expected = config.expected_tensor_shapes()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterFormatError(f"tensor {missing[0]!r}: missing (config asks for it)")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AdapterFormatError(f"tensor {extra[0]!r}: not part of format v1 for this config")
    for name, shape in expected.items():
        t = tensors[name]
        if t.dtype not in FLOAT_DTYPES:
            raise AdapterFormatError(
                f"tensor {name!r}: dtype {str(t.dtype).removeprefix('torch.')} is not "
                "float32, float16 or bfloat16"
            )
        if tuple(t.shape) != shape:
            raise AdapterFormatError(
                f"tensor {name!r}: shape {list(t.shape)} does not match config, expected {list(shape)}"
            )
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterFormatError(f"tensor {name!r}: {bad} NaN or Inf value(s)")


def write_adapter_file(
    path: str | os.PathLike[str],
    config: AdapterConfig,
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """Validate, then write atomically: a failed save leaves no partial file."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    validate_tensors(config, cpu)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config.dumps(),
    }
    with atomic_output(path) as tmp:
        save_file(cpu, str(tmp), metadata=metadata)
        _canonicalize_header(tmp)


def _canonicalize_header(path: Path) -> None:
    """Rewrite the safetensors header with sorted keys, so equal adapters are equal bytes.

    The library serialises ``__metadata__`` from a hash map, in a different order on each
    save; build caches key engines by the file's sha256, so the same adapter saved twice must
    hash the same. Tensor offsets are untouched: only the header's key order changes, and
    the header keeps its length (it is padded with spaces, which the format allows).
    """
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # cannot happen for the compact form; keep the library's bytes
            return
        f.seek(8)
        f.write(text + b" " * (length - len(text)))



def _one_line(exc: Any) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
