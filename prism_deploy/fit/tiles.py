"""Between a pipe's tiles ``[R*C, tr, tc]`` and the real ``[out_dim, in_dim]`` matrix they hold."""

from __future__ import annotations

import torch

from prism_deploy.format import PipeSpec


def tiles_from_dense(w: torch.Tensor, spec: PipeSpec) -> torch.Tensor:
    """Cut ``w`` ``[out_dim, in_dim]`` into the pipe's tiles, zero in the padding.

    Worker ``r*C + c`` gets rows ``[r*tr, (r+1)*tr)`` and columns ``[c*tc, (c+1)*tc)`` of
    ``w`` zero-padded to ``[R*tr, C*tc]`` (format v1's row-major worker order).
    """
    (R, C), (tr, tc) = spec.grid, spec.tile
    padded = torch.zeros(R * tr, C * tc, dtype=w.dtype)
    padded[: w.shape[0], : w.shape[1]] = w
    return padded.reshape(R, tr, C, tc).permute(0, 2, 1, 3).reshape(R * C, tr, tc).contiguous()


def dense_from_tiles(tiles: torch.Tensor, spec: PipeSpec, in_dim: int, out_dim: int) -> torch.Tensor:
    """The inverse of ``tiles_from_dense``: the real ``[out_dim, in_dim]`` part of the grid."""
    (R, C), (tr, tc) = spec.grid, spec.tile
    padded = tiles.reshape(R, C, tr, tc).permute(0, 2, 1, 3).reshape(R * tr, C * tc)
    return padded[:out_dim, :in_dim]


def worker_block(spec: PipeSpec, worker: int, in_dim: int, out_dim: int) -> tuple[slice, slice]:
    """The real output rows and input columns of ``worker`` (empty slices when all padding)."""
    r, c = divmod(worker, spec.cols)
    tr, tc = spec.tile
    rows = slice(min(r * tr, out_dim), min((r + 1) * tr, out_dim))
    cols = slice(min(c * tc, in_dim), min((c + 1) * tc, in_dim))
    return rows, cols
