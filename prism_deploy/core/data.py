"""Reading matrices of activations (model-A hidden states, targets, calibration data).

Files are ``.npy`` (memory-mapped), ``.npz`` or ``.safetensors``, each holding a 2-D array
``[n, dim]``; ``name`` (or a ``FILE:NAME`` argument) picks an array in a multi-array file,
and ``prefer`` names the array to take when none is named (``collect`` writes ``X`` and ``Z``
into one file). Rows can be streamed in chunks so that ``n`` may exceed memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core.errors import PrismInputError

SUPPORTED = (".npy", ".npz", ".safetensors")


class MatrixFile:
    """A 2-D float array in a file, read whole or in row chunks, as float32 (or float64)."""

    def __init__(self, path: str | os.PathLike[str], name: str | None = None, *, prefer: str | None = None) -> None:
        self.path, self.name = split_name(path, name)
        self.prefer = prefer
        if not self.path.is_file():
            raise PrismInputError(f"{self.path}: no such file")
        self.kind = self.path.suffix.lower()
        if self.kind not in SUPPORTED:
            raise PrismInputError(
                f"{self.path}: unknown file type {self.kind or '(none)'!r}, expected one of {', '.join(SUPPORTED)}"
            )
        self.shape = self._read_shape()
        if len(self.shape) != 2:
            raise PrismInputError(f"{self._label()}: expected a 2-D array [n, dim], got shape {list(self.shape)}")

    # ---- public ----------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return int(self.shape[0])

    @property
    def cols(self) -> int:
        return int(self.shape[1])

    def read(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        return self.rows_range(0, self.rows, dtype)

    def iter_chunks(self, chunk_rows: int, dtype: np.dtype | type = np.float32) -> Iterator[np.ndarray]:
        for start in range(0, self.rows, chunk_rows):
            yield self.rows_range(start, min(start + chunk_rows, self.rows), dtype)

    def rows_range(self, start: int, stop: int, dtype: np.dtype | type = np.float32) -> np.ndarray:
        block = self._slice(start, stop)
        if not np.issubdtype(block.dtype, np.floating) and block.dtype.name != "bfloat16":
            raise PrismInputError(f"{self._label()}: dtype {block.dtype} is not a float type")
        out = np.asarray(block, dtype=dtype)
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).sum())
            raise PrismInputError(f"{self._label()}: {bad} NaN or Inf value(s) in rows {start}..{stop - 1}")
        return out

    # ---- per format ------------------------------------------------------------------
    def _label(self) -> str:
        return f"{self.path}" + (f"[{self.name}]" if self.name else "")

    def _read_shape(self) -> tuple[int, ...]:
        try:
            if self.kind == ".npy":
                self._npy = np.load(self.path, mmap_mode="r", allow_pickle=False)
                return tuple(self._npy.shape)
            if self.kind == ".npz":
                self._npz = NpzMember(self.path, self._pick)
                self.name = self._npz.name
                return self._npz.shape
            from safetensors import safe_open

            self._st = safe_open(str(self.path), framework="pt")
            self.name = self._pick(list(self._st.keys()))
            return tuple(self._st.get_slice(self.name).get_shape())
        except PrismInputError:
            raise
        except Exception as exc:  # the loaders' own parse errors, whatever their type
            raise PrismInputError(f"{self.path}: cannot read ({' '.join(str(exc).split())})") from None

    def _pick(self, names: list[str]) -> str:
        if self.name is not None:
            if self.name not in names:
                raise PrismInputError(f"{self.path}: no array named {self.name!r} (has {names})")
            return self.name
        if len(names) == 1:
            return names[0]
        if self.prefer in names:
            return self.prefer
        raise PrismInputError(f"{self.path}: holds several arrays {names}; name one")

    def _slice(self, start: int, stop: int) -> np.ndarray:
        if self.kind == ".npy":
            return np.asarray(self._npy[start:stop])
        if self.kind == ".npz":
            return self._npz.rows(start, stop)
        import torch

        t = self._st.get_slice(self.name)[start:stop]
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()


class NpzMember:
    """One array of an ``.npz`` archive, read a row range at a time.

    ``np.load(...)[name]`` decompresses the whole array for every access: a 2 MB archive of
    zeros can declare gigabytes, and reading its shape alone would allocate them. Here only the
    member's ``.npy`` header is read to learn the shape, the declared size is checked against
    the size the archive records for the member, and rows are decompressed as they are asked
    for (forward reads stream; a backward seek decompresses from the start again)."""

    def __init__(self, path: Path, pick: Any) -> None:
        import zipfile

        self.path = path
        self._zip = zipfile.ZipFile(path)
        names = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]
        self.name = pick(names)
        info = self._zip.getinfo(self.name + ".npy")
        self._fh = self._zip.open(info)
        version = np.lib.format.read_magic(self._fh)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise PrismInputError(f"{path}[{self.name}]: .npy format version {version} is not supported")
        read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(self._fh)
        if dtype.hasobject:
            raise PrismInputError(f"{path}[{self.name}]: holds Python objects (pickled data), not numbers")
        if fortran and len(shape) > 1:
            raise PrismInputError(
                f"{path}[{self.name}]: stored in Fortran order; save it in C order (np.ascontiguousarray)"
            )
        self.shape, self.dtype = tuple(int(d) for d in shape), dtype
        self._data = self._fh.tell()
        declared = self._data + int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize
        if declared != info.file_size:
            raise PrismInputError(
                f"{path}[{self.name}]: the header declares {declared:,} bytes, the archive holds {info.file_size:,}"
            )

    def rows(self, start: int, stop: int) -> np.ndarray:
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fh.seek(self._data + start * row_bytes)
        data = self._fh.read((stop - start) * row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, *self.shape[1:])


def split_name(path: str | os.PathLike[str], name: str | None = None) -> tuple[Path, str | None]:
    """``FILE:NAME`` -> (FILE, NAME) when FILE exists and the whole string is no file."""
    p = Path(path)
    text = str(path)
    if name is None and not p.exists() and ":" in text:
        head, _, tail = text.rpartition(":")
        if tail and Path(head).is_file():
            return Path(head), tail
    return p, name


def load_matrix(
    path: str | os.PathLike[str],
    name: str | None = None,
    dtype: np.dtype | type = np.float32,
    *,
    prefer: str | None = "X",
) -> np.ndarray:
    """The whole array; by default model-A hidden states (``X``) of a pairs file."""
    return MatrixFile(path, name, prefer=prefer).read(dtype)
