"""Reading and writing ``adapter.safetensors`` files of format v1, as numpy arrays.

The safetensors library parses the container; this module checks what format v1 adds on
top (metadata, config, tensor names, shapes, dtypes, finiteness) and turns every failure
into one ``AdapterFormatError`` line that names the file and the key or tensor at fault.
Tensors are numpy arrays (bfloat16 through ``ml_dtypes``, which ``onnx`` already needs), so
reading, inspecting, lowering and running an adapter never needs PyTorch; the PyTorch
reference wraps the same arrays (``prism_deploy.reference``).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from prism_deploy.core import jsontext
from prism_deploy.core.blocks import blocks
from prism_deploy.core.errors import AdapterFormatError, brief
from prism_deploy.core.fsutil import atomic_output, file_sha256
from prism_deploy.format.adapter_config import FORMAT_NAME, FORMAT_VERSION, AdapterConfig

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)

__all__ = [
    "AdapterTensors",
    "FLOAT_DTYPES",
    "adapter_arrays",
    "config_from_metadata",
    "file_sha256",
    "read_adapter_config",
    "read_adapter_file",
    "validate_tensors",
    "write_adapter_file",
]


def dtype_name(dtype: Any) -> str:
    """``float32``, ``float16``, ``bfloat16``, ... for numpy and torch dtypes alike."""
    return str(dtype).removeprefix("torch.")


@dataclass
class AdapterTensors:
    """A validated adapter: its config and its tensors (numpy, in the stored dtypes)."""

    config: AdapterConfig
    tensors: dict[str, np.ndarray]

    def arrays(self) -> AdapterTensors:
        return self

    # ---- views of the tensors ----------------------------------------------------------------
    def tiles(self, pipe: int) -> np.ndarray:
        return self.tensors[f"pipes.{pipe}.tiles"]

    def gate(self, pipe: int) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.config.pipes[pipe].gated:
            return None
        return self.tensors[f"pipes.{pipe}.gate.weight"], self.tensors[f"pipes.{pipe}.gate.bias"]

    def betas(self) -> list[float]:
        """The combine weight of each pipe (1.0 each for ``combine = sum``), as float64 values."""
        if self.config.combine != "weighted":
            return [1.0] * self.config.num_pipes
        return [float(b) for b in np.asarray(self.tensors["combine.weight"], dtype=np.float64)]

    def pipe(self, index: int) -> AdapterTensors:
        """Pipe ``index`` alone, as a one-pipe adapter (combine ``sum``: whoever runs it applies
        the combine weight), so pipes can be built, loaded and swapped one by one."""
        cfg = self.config
        sub = AdapterConfig(cfg.in_dim, cfg.out_dim, (cfg.pipes[index],), "sum")
        prefix = f"pipes.{index}."
        return AdapterTensors(
            sub, {f"pipes.0.{k[len(prefix) :]}": v for k, v in self.tensors.items() if k.startswith(prefix)}
        )

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.tensors.values())

    def describe(self) -> dict[str, Any]:
        return describe(self.config, self.tensors)

    def content_digest(self) -> str:
        """``sha256:...`` of what the adapter computes: its topology and every tensor's name,
        dtype, shape and bytes (notes such as ``source`` left out). A lowered graph records it,
        so a graph is never checked against an adapter it was not lowered from."""
        import hashlib

        h = hashlib.sha256(json.dumps(self.config.topology(), sort_keys=True).encode())
        for name in sorted(self.tensors):
            t = np.ascontiguousarray(self.tensors[name])
            h.update(json.dumps([name, dtype_name(t.dtype), list(t.shape)]).encode())
            flat = t.reshape(-1).view(np.uint8)
            for start in range(0, flat.size, 1 << 26):  # 64 MiB at a time: no copy of big tensors
                h.update(flat[start : start + (1 << 26)].tobytes())  # a 64 MiB copy at most
        return "sha256:" + h.hexdigest()


def adapter_arrays(adapter: Any) -> AdapterTensors:
    """``AdapterTensors`` of an adapter given as such, or as any object with ``arrays()``
    (the PyTorch reference's ``PrismAdapter``)."""
    if isinstance(adapter, AdapterTensors):
        return adapter
    if hasattr(adapter, "arrays"):
        return adapter.arrays()
    raise TypeError(f"expected an adapter (AdapterTensors or PrismAdapter), got {type(adapter).__name__}")


def read_adapter_file(path: str | os.PathLike[str]) -> AdapterTensors:
    """Load and fully validate a v1 adapter file.

    The float tensors map the file (copy-on-write: writable, and writes never reach the file)
    instead of being read into memory: a multi-GB adapter costs pages of the page cache, which
    the kernel can drop and read again, and whatever uses the tensors reads them a block at a
    time (``export`` writes the ONNX weights from them without a copy of its own). Replace the
    file by renaming a new one over it (``write_adapter_file`` does) while its tensors are in
    use; rewriting it in place would change or cut the mapped bytes under them.
    """
    from safetensors import safe_open

    p = Path(path)
    header, data_start = _check_is_file(p)
    try:
        # the container's own checks (offsets in bounds, contiguous, sized by shape and dtype)
        with safe_open(str(p), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            names = list(handle.keys())
            tensors = {name: handle.get_tensor(name) for name in names if _mapped_dtype(header[name]) is None}
    except AdapterFormatError:
        raise
    except Exception as exc:  # the container parser's own errors, whatever their type
        raise AdapterFormatError(f"{p}: not a valid safetensors file ({brief(exc) or type(exc).__name__})") from None
    tensors.update(_map_tensors(p, header, data_start, [n for n in names if n not in tensors]))
    tensors = {name: tensors[name] for name in names}
    try:
        config = config_from_metadata(metadata)
        validate_tensors(config, tensors)
    except AdapterFormatError as exc:
        raise AdapterFormatError(f"{p}: {exc}") from None
    return AdapterTensors(config, tensors)


def read_adapter_config(path: str | os.PathLike[str]) -> AdapterConfig:
    """The adapter's config from the file header only (a build cache hit never reads the weights)."""
    from safetensors import safe_open

    p = Path(path)
    _check_is_file(p)
    try:
        with safe_open(str(p), framework="numpy") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # the container parser's own error types
        raise AdapterFormatError(f"{p}: not a valid safetensors file ({brief(exc) or type(exc).__name__})") from None
    try:
        return config_from_metadata(metadata)
    except AdapterFormatError as exc:
        raise AdapterFormatError(f"{p}: {exc}") from None


_SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": BFLOAT16}


def _mapped_dtype(entry: Any) -> np.dtype | None:
    """The dtype of a header entry that ``read_adapter_file`` maps (a non-empty float tensor);
    None for anything else, which the container parser reads (and validation then refuses)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
        return None
    dtype = _SAFETENSORS_DTYPES.get(str(entry.get("dtype")))
    if dtype is None or any(not isinstance(d, int) or d <= 0 for d in entry["shape"]):
        return None
    return dtype


def _map_tensors(p: Path, header: dict[str, Any], data_start: int, names: list[str]) -> dict[str, np.ndarray]:
    """``names``' tensors as arrays over one copy-on-write mapping of the file."""
    if not names:
        return {}
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out: dict[str, np.ndarray] = {}
    for name in names:
        entry = header[name]
        dtype = _mapped_dtype(entry)
        assert dtype is not None
        begin, end = (int(v) for v in entry["data_offsets"])
        shape = tuple(int(d) for d in entry["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize or data_start + end > size:  # checked by the parser too
            raise AdapterFormatError(f"{p}: tensor {name!r}: data offsets do not match its shape and dtype")
        array = np.frombuffer(mapping, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
        # safetensors writers align every tensor; one that is not would trip consumers that
        # assume alignment (torch.from_numpy), so it is copied instead
        out[name] = array if array.flags.aligned else array.copy()
    return out


def _check_is_file(p: Path) -> tuple[dict[str, Any], int]:
    """An adapter file as far as can be told before the container parser reads it: a regular
    file, not an ONNX model, whose header is bounded and is strict JSON (no repeated key).
    Returns the header and where the tensors' data starts.

    The bound keeps a small file from costing gigabytes: a v1 header lists a few tensors and a
    config of a few KB, while a ``source`` note of millions of empty lists would take far more
    memory to parse than its bytes suggest."""
    if not p.exists():
        raise AdapterFormatError(f"{p}: no such file")
    if not p.is_file():
        from prism_deploy.format.model_folder import not_an_adapter

        raise AdapterFormatError(f"{p}: {not_an_adapter(p) or 'not a file'}")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(16)
        if len(head) < 8:
            raise AdapterFormatError(f"{p}: not a valid safetensors file ({size} bytes, too short)")
        (length,) = struct.unpack("<Q", head[:8])
        if _looks_like_onnx(head) and length > size - 8:
            raise AdapterFormatError(
                f"{p}: is an ONNX model, not an adapter (.safetensors, format v1); "
                "give the adapter it was exported from"
            )
        if length > size - 8:
            raise AdapterFormatError(
                f"{p}: not a valid safetensors file (header length {length} is past the end of the {size}-byte file)"
            )
        if length > MAX_HEADER_BYTES:
            raise AdapterFormatError(
                f"{p}: header of {length:,} bytes is over the {MAX_HEADER_BYTES:,}-byte bound "
                "of an adapter (a note too large?)"
            )
        f.seek(8)
        header = jsontext.loads(f.read(length), f"{p}: not a valid safetensors file; header", AdapterFormatError)
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{p}: not a valid safetensors file (the header is not a JSON object)")
    return header, 8 + length


# the most header bytes an adapter file may have (a v1 header is a few KB)
MAX_HEADER_BYTES = 16 << 20


def _looks_like_onnx(head: bytes) -> bool:
    """An ONNX ModelProto starts with field 1 (ir_version, a small varint), then another field
    of the message: producer name, graph, opset import..."""
    return (
        len(head) >= 3
        and head[0] == 0x08
        and 0 < head[1] < 0x80
        and head[2] in (0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A, 0x40, 0x42, 0x52, 0x5A, 0x62, 0x72, 0x7A)
    )


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


def _as_numpy(t: Any) -> np.ndarray:
    """A tensor (numpy or torch, any device) as a numpy array in its own dtype."""
    if isinstance(t, np.ndarray):
        return t
    if hasattr(t, "detach"):  # torch; bfloat16 crosses as its bits
        t = t.detach().to("cpu").contiguous()
        if str(t.dtype) == "torch.bfloat16":
            import torch

            return t.view(torch.int16).numpy().view(BFLOAT16)
        return t.numpy()
    return np.asarray(t)


def validate_tensors(config: AdapterConfig, tensors: Mapping[str, Any]) -> None:
    expected = config.expected_tensor_shapes()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterFormatError(f"tensor {missing[0]!r}: missing (config asks for it)")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AdapterFormatError(f"tensor {extra[0]!r}: not part of format v1 for this config")
    for name, shape in expected.items():
        t = _as_numpy(tensors[name])
        if t.dtype not in FLOAT_DTYPES:
            raise AdapterFormatError(
                f"tensor {name!r}: dtype {dtype_name(t.dtype)} is not float32, float16 or bfloat16"
            )
        if tuple(t.shape) != shape:
            raise AdapterFormatError(
                f"tensor {name!r}: shape {list(t.shape)} does not match config, expected {list(shape)}"
            )
        bad = _count_nonfinite(t)
        if bad:
            raise AdapterFormatError(f"tensor {name!r}: {bad} NaN or Inf value(s)")


def _count_nonfinite(t: np.ndarray) -> int:
    """NaN and Inf values in ``t``, a block at a time (no full-size temporary)."""
    bad = 0
    for block in blocks(t):
        finite = np.isfinite(block.astype(np.float32) if block.dtype == BFLOAT16 else block)
        bad += int(finite.size - np.count_nonzero(finite))
    return bad


def write_adapter_file(
    path: str | os.PathLike[str],
    config: AdapterConfig,
    tensors: Mapping[str, Any],
) -> None:
    """Validate, then write atomically: a failed save leaves no partial file.

    ``tensors`` may be numpy arrays or torch tensors (moved to the CPU, bfloat16 kept).
    """
    arrays = {name: np.ascontiguousarray(_as_numpy(t)) for name, t in tensors.items()}
    validate_tensors(config, arrays)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config.dumps(),
    }
    with atomic_output(path) as tmp:
        save_safetensors(arrays, tmp, metadata)
        _canonicalize_header(tmp)


def save_safetensors(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str]) -> None:
    """``safetensors.numpy.save_file``, its I/O failures raised as ``OSError`` (the library
    raises its own error type), so that a full disk is reported like any other write error."""
    import errno
    import re

    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    try:
        save_file(dict(arrays), str(path), metadata=dict(metadata))
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number) if number in errno.errorcode else str(exc), str(path)) from None


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


def describe(config: AdapterConfig, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Plain facts about an adapter: sizes, FLOPs and weight bytes per token, dense and gated.

    Per token, "dense" counts every worker; "gated" counts only the ``top_k`` selected ones
    (what a kernel that reads only the selected tiles moves) plus the gate itself.
    """
    arrays = {k: _as_numpy(v) for k, v in tensors.items()}
    pipes = []
    totals = {"params": 0, "bytes": 0, "flops_dense": 0, "flops_gated": 0, "bytes_dense": 0, "bytes_gated": 0}
    for i, spec in enumerate(config.pipes):
        tiles = arrays[f"pipes.{i}.tiles"]
        item = tiles.dtype.itemsize
        tile_elems = spec.tile_rows * spec.tile_cols
        params = spec.tile_params
        gate_params = (spec.workers * config.in_dim + spec.workers) if spec.gated else 0
        gate_bytes = sum(int(arrays[f"pipes.{i}.gate.{n}"].nbytes) for n in ("weight", "bias")) if spec.gated else 0
        gate_flops = 2 * spec.workers * config.in_dim if spec.gated else 0
        entry: dict[str, Any] = {
            "index": i,
            "name": spec.name,
            "grid": list(spec.grid),
            "tile": list(spec.tile),
            "workers": spec.workers,
            "top_k": spec.top_k,
            "gate_scale": spec.gate_scale if spec.gated else None,
            "dtype": dtype_name(tiles.dtype),
            "params": params + gate_params,
            "bytes": params * item + gate_bytes,
            "padding_workers": len(spec.padding_workers(config.in_dim, config.out_dim)),
            "flops_per_token_dense": 2 * spec.workers * tile_elems + gate_flops,
            "flops_per_token_gated": 2 * spec.active_workers * tile_elems + gate_flops,
            "weight_bytes_per_token_dense": spec.workers * tile_elems * item + gate_bytes,
            "weight_bytes_per_token_gated": spec.active_workers * tile_elems * item + gate_bytes,
        }
        pipes.append(entry)
        totals["params"] += entry["params"]
        totals["bytes"] += entry["bytes"]
        totals["flops_dense"] += entry["flops_per_token_dense"]
        totals["flops_gated"] += entry["flops_per_token_gated"]
        totals["bytes_dense"] += entry["weight_bytes_per_token_dense"]
        totals["bytes_gated"] += entry["weight_bytes_per_token_gated"]
    if config.combine == "weighted":
        w = arrays["combine.weight"]
        totals["params"] += int(w.size)
        totals["bytes"] += int(w.nbytes)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "in_dim": config.in_dim,
        "out_dim": config.out_dim,
        "combine": config.combine,
        "combine_weights": [float(v) for v in arrays["combine.weight"].astype(np.float32)]
        if config.combine == "weighted"
        else None,
        "pipes": pipes,
        "params": totals["params"],
        "bytes": totals["bytes"],
        "flops_per_token": {"dense": totals["flops_dense"], "gated": totals["flops_gated"]},
        "weight_bytes_per_token": {"dense": totals["bytes_dense"], "gated": totals["bytes_gated"]},
        "source": config.source_model,
        "target": config.target_model,
    }
