"""Arrays too large to copy whole, walked a bounded block at a time.

One budget (``BLOCK_BYTES``) and one way of cutting an array into blocks along its first axis,
shared by everything that scans or rewrites weights: the adapter file's NaN/Inf check, the tile
layout's re-layout and quantization, and the writer that streams initializers to disk
(``DeferredTensor``). A block is a view where the array allows one, so the memory a pass holds
beyond its input is a few blocks, whatever the size of the weights (docs/onnx-lowering.md,
"Memory").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

# Bytes per block: large enough that per-block overhead (a numpy call, a write) is noise,
# small enough that a few blocks held at once stay a small part of a multi-GB adapter.
BLOCK_BYTES = 64 << 20


def row_ranges(rows: int, row_bytes: int, budget: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``rows`` rows of ``row_bytes`` each, about ``budget``
    bytes (``BLOCK_BYTES``) per range and at least one row."""
    step = max(1, (BLOCK_BYTES if budget is None else budget) // max(1, row_bytes))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def blocks(a: Any, budget: int | None = None) -> Iterator[Any]:
    """``a`` cut along its first axis into blocks of about ``budget`` bytes (views of ``a``);
    a 0-d array is one block."""
    if np.ndim(a) == 0:
        yield a
        return
    row_bytes = int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize
    for start, stop in row_ranges(a.shape[0], row_bytes, budget):
        yield a[start:stop]


@dataclass(frozen=True)
class DeferredTensor:
    """An initializer whose value is computed when it is saved, rows (along the first axis) at a
    time, so that a multi-GB weight is never held whole: the saver asks for one block of rows,
    writes it, and drops it (``prism_deploy.core.onnx_io.save_model``).

    ``rows(start, stop)`` returns rows ``start:stop`` as a C-contiguous array of ``dtype`` and
    shape ``(stop - start, *shape[1:])``; it must give the same values however the rows are cut.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    rows: Callable[[int, int], np.ndarray]

    def __post_init__(self) -> None:
        if not self.shape:
            raise ValueError("deferred tensor: needs at least one axis to cut into rows")

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def blocks(self, budget: int | None = None) -> Iterator[np.ndarray]:
        """The value, block after block (about ``budget`` bytes each), in storage order."""
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize
        for start, stop in row_ranges(self.shape[0], row_bytes, budget):
            yield self._checked(self.rows(start, stop), (stop - start, *self.shape[1:]))

    @classmethod
    def of_array(cls, a: np.ndarray) -> DeferredTensor:
        """An array already in memory, written a block of rows at a time (a strided view, such
        as a transposed weight, is copied one block at a time, never whole)."""
        return cls(tuple(int(d) for d in a.shape), a.dtype, lambda start, stop: np.ascontiguousarray(a[start:stop]))

    def materialize(self) -> np.ndarray:
        """The whole value as one array (the in-memory model)."""
        out = np.empty(self.shape, dtype=self.dtype)
        at = 0
        for block in self.blocks():
            out[at : at + len(block)] = block
            at += len(block)
        return out

    def _checked(self, block: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if block.shape != shape or block.dtype != self.dtype or not block.flags.c_contiguous:
            raise ValueError(
                f"deferred tensor: rows gave {block.dtype}{list(block.shape)}"
                f"{'' if block.flags.c_contiguous else ' (not contiguous)'}, "
                f"expected {np.dtype(self.dtype)}{list(shape)}"
            )
        return block
