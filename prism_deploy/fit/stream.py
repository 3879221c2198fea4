"""Paired activations ``X`` ``[n, in_dim]`` and targets ``Z`` ``[n, out_dim]``, streamed in chunks.

Fitting never holds all of ``X`` in memory: every statistic is accumulated chunk by chunk.
The held-out split is a pure function of a row's index and the seed (a hash, not a
permutation), so each chunk can decide alone which of its rows are held out, and the same
rows are held out whatever the chunk size, in ``fit``, ``workers`` and ``refit`` alike.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from prism_deploy.core.data import MatrixFile
from prism_deploy.core.errors import PrismInputError

Split = Literal["train", "holdout", "all"]

DEFAULT_CHUNK_ROWS = 4096


def holdout_mask(start: int, stop: int, fraction: float, seed: int) -> np.ndarray:
    """Bool mask of the held-out rows among rows ``[start, stop)``.

    Row ``i`` is held out when ``splitmix64(i + seed * golden) / 2**64 < fraction``: a
    deterministic, well-mixed coin per row, independent of how the rows are chunked.
    """
    if fraction <= 0.0:
        return np.zeros(stop - start, dtype=bool)
    if fraction >= 1.0:
        return np.ones(stop - start, dtype=bool)
    with np.errstate(over="ignore"):
        z = np.arange(start, stop, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


class PairedData:
    """``X`` and ``Z`` files with equal row counts, and the deterministic held-out split."""

    def __init__(
        self,
        x_path: str | os.PathLike[str],
        z_path: str | os.PathLike[str],
        *,
        holdout: float = 0.1,
        seed: int = 0,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> None:
        self.x = MatrixFile(x_path, prefer="X")
        self.z = MatrixFile(z_path, prefer="Z")
        if self.x.rows != self.z.rows:
            raise PrismInputError(
                f"--x {self.x.path} has {self.x.rows} rows but --z {self.z.path} has {self.z.rows}: "
                "each row of X must pair with the same row of Z"
            )
        if self.x.rows == 0:
            raise PrismInputError(f"--x {self.x.path}: no rows")
        if not 0.0 <= holdout <= 1.0:
            raise PrismInputError(f"--holdout: {holdout} is not a fraction in [0, 1]")
        if chunk_rows < 1:
            raise PrismInputError(f"chunk_rows: must be positive, got {chunk_rows}")
        self.holdout = holdout
        self.seed = seed
        self.chunk_rows = chunk_rows

    @classmethod
    def from_arrays(cls, x: np.ndarray, z: np.ndarray, tmpdir: str | os.PathLike[str], **kw: object) -> PairedData:
        """Write two arrays to ``.npy`` files in ``tmpdir`` and open them (tests, notebooks)."""
        xp, zp = os.path.join(tmpdir, "x.npy"), os.path.join(tmpdir, "z.npy")
        np.save(xp, x)
        np.save(zp, z)
        return cls(xp, zp, **kw)  # type: ignore[arg-type]

    def with_chunk_rows(self, chunk_rows: int) -> PairedData:
        """The same files and split, read ``chunk_rows`` rows at a time (every statistic is a sum
        over rows and gate minibatches come from fixed blocks, so only rounding depends on it)."""
        if chunk_rows < 1:
            raise PrismInputError(f"chunk_rows: must be positive, got {chunk_rows}")
        other = copy.copy(self)
        other.chunk_rows = chunk_rows
        return other

    @property
    def in_dim(self) -> int:
        return self.x.cols

    @property
    def out_dim(self) -> int:
        return self.z.cols

    @property
    def rows(self) -> int:
        return self.x.rows

    def count(self, split: Split) -> int:
        """Rows in ``split`` (one cheap pass over the mask only, no data read)."""
        if split == "all":
            return self.rows
        held = sum(
            int(holdout_mask(a, min(a + 1_000_000, self.rows), self.holdout, self.seed).sum())
            for a in range(0, self.rows, 1_000_000)
        )
        return held if split == "holdout" else self.rows - held

    def chunks(
        self, split: Split = "train", dtype: torch.dtype = torch.float64
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, z)`` tensors of the rows of ``split``, ``chunk_rows`` file rows at a time."""
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        for start in range(0, self.rows, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.rows)
            x = self.x.rows_range(start, stop, np_dtype)
            z = self.z.rows_range(start, stop, np_dtype)
            if split != "all":
                held = holdout_mask(start, stop, self.holdout, self.seed)
                keep = held if split == "holdout" else ~held
                if not keep.any():
                    continue
                x, z = x[keep], z[keep]
            yield torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(z))

    def blocks(
        self, split: Split, block_rows: int, dtype: torch.dtype = torch.float64
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rows of ``split`` re-cut into blocks of exactly ``block_rows`` rows (the last may be
        shorter), whatever ``chunk_rows`` is: what depends on block boundaries (minibatches of gate
        training) is then the same for every chunk size."""
        xs: list[torch.Tensor] = []
        zs: list[torch.Tensor] = []
        held = 0
        for x, z in self.chunks(split, dtype):
            xs.append(x)
            zs.append(z)
            held += x.shape[0]
            while held >= block_rows:
                xa, za = torch.cat(xs), torch.cat(zs)
                yield xa[:block_rows], za[:block_rows]
                xs, zs = [xa[block_rows:]], [za[block_rows:]]
                held -= block_rows
        if held:
            yield torch.cat(xs), torch.cat(zs)
