"""The tile layout: the one home of how a pipe's tiles sit in its matrix, and of INT8 tiles.

A pipe of ``R x C`` workers with ``tr x tc`` tiles stores ``tiles`` ``[R*C, tr, tc]``, worker
``w = r*C + c`` (format v1's row-major order). Assembled, they form the padded matrix
``[R*tr, C*tc]`` (output rows x input columns): worker ``w``'s tile sits at rows
``r*tr .. (r+1)*tr`` and columns ``c*tc .. (c+1)*tc``. The real matrix is its top-left
``[out_dim, in_dim]``; the rest is padding (padded input columns multiply zeros, padded output
rows are cut).

The tile arithmetic (``ceil_div``, ``covering_tile``, ``real_blocks``, ``padded_shape``,
``real_workers``, ``padding_worker_count``) is here too, once: the planner, the format's
checks, the fit's layout and budget, the kernel's launch and the lowering all count blocks and
padding the same way.

INT8 tiles: symmetric, one float32 scale per tile row (scales ``[R*C, tr]``), so a worker never
shares a scale with another and a small tile keeps its own resolution: ``q = round(t / s)``
clipped to [-127, 127], ``s = max|row| / 127`` (a row of zeros gets scale 1, so dequantization
is exact and nothing divides by zero). INT4 tiles: the same with codes -7..7 (``QMAX_INT4``),
stored two to a byte (``pack_int4``).

The layout functions take numpy arrays or torch tensors and return the same kind, so the
PyTorch reference, the fitting code and the numpy lowering share one definition. The
row-block forms (``dense_rows``, ``row_scales`` + ``quantize_with_scales``) give the same values
a bounded block at a time, for weights too large to copy whole (numpy only).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prism_deploy.core.blocks import blocks
from prism_deploy.core.precision import Precision

QMAX = 127.0
QMAX_INT4 = 7.0  # symmetric 4-bit: codes -7..7 (the -8 code unused, as for int8's -128)


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers ``b > 0``, exact (no float)."""
    return -(-a // b)


def covering_tile(grid: tuple[int, int], in_dim: int, out_dim: int) -> tuple[int, int]:
    """The smallest ``(tr, tc)`` whose ``R x C`` grid covers ``out_dim x in_dim``."""
    return ceil_div(out_dim, grid[0]), ceil_div(in_dim, grid[1])


def real_blocks(dim: int, tile: int) -> int:
    """Blocks of ``tile`` that hold at least one real (non-padding) index of ``dim``; blocks
    from this index on lie wholly in the padding (cap it at the grid's count)."""
    return ceil_div(dim, tile)


def padded_shape(grid: tuple[int, int], tile: tuple[int, int]) -> tuple[int, int]:
    """The padded matrix the tiles form: ``(R*tr output rows, C*tc input columns)``."""
    return grid[0] * tile[0], grid[1] * tile[1]


def real_workers(grid: tuple[int, int], tile: tuple[int, int], in_dim: int, out_dim: int) -> int:
    """Workers whose tile holds at least one real weight."""
    return min(grid[0], real_blocks(out_dim, tile[0])) * min(grid[1], real_blocks(in_dim, tile[1]))


def padding_worker_count(grid: tuple[int, int], tile: tuple[int, int], in_dim: int, out_dim: int) -> int:
    """Workers wholly in the padding, by arithmetic (``PipeSpec.padding_workers`` lists them)."""
    return grid[0] * grid[1] - real_workers(grid, tile, in_dim, out_dim)


def _permute(a: Any, axes: tuple[int, ...]) -> Any:
    return a.permute(*axes) if hasattr(a, "permute") else a.transpose(axes)


def _zeros_like(a: Any, shape: tuple[int, ...]) -> Any:
    return a.new_zeros(shape) if hasattr(a, "new_zeros") else np.zeros(shape, dtype=a.dtype)


def dense_from_tiles(
    tiles: Any,
    grid: tuple[int, int],
    tile: tuple[int, int],
    *,
    crop: tuple[int, int] | None = None,
    transpose: bool = False,
) -> Any:
    """The tiles assembled: ``[R*tr, C*tc]`` (``crop=(out_dim, in_dim)``: its real part).

    ``transpose=True`` gives ``[C*tc, R*tr]`` (inputs x outputs, what ``x @ W`` wants) in one
    permutation, without assembling the untransposed matrix first. A view where the library
    can; callers that need contiguous memory copy it once.
    """
    (R, C), (tr, tc) = grid, tile
    t = tiles.reshape(R, C, tr, tc)
    if transpose:
        m = _permute(t, (1, 3, 0, 2)).reshape(C * tc, R * tr)
        return m if crop is None else m[: crop[1], : crop[0]]
    m = _permute(t, (0, 2, 1, 3)).reshape(R * tr, C * tc)
    return m if crop is None else m[: crop[0], : crop[1]]


def dense_rows(
    tiles: np.ndarray,
    grid: tuple[int, int],
    tile: tuple[int, int],
    start: int,
    stop: int,
    *,
    crop: tuple[int, int] | None = None,
    dtype: Any = None,
) -> np.ndarray:
    """Rows ``start:stop`` of ``dense_from_tiles(tiles, grid, tile, crop=crop, transpose=True)``
    (inputs x outputs), a new C-contiguous array of ``dtype`` (default: the tiles'), read from
    the tiles without assembling the rest of the matrix: the dense weight a row-block at a time.

    Row ``c*tc + j`` of the transposed matrix is column ``j`` of every tile in column-block
    ``c``, laid end to end (row-block 0's ``tr`` values, then row-block 1's, ...); the crop keeps
    the first ``crop[0]`` of them. numpy only.
    """
    (R, C), (tr, tc) = grid, tile
    width = R * tr if crop is None else crop[0]
    t = tiles.reshape(R, C, tr, tc)
    out = np.empty((stop - start, width), dtype=tiles.dtype if dtype is None else dtype)
    whole, rest = divmod(width, tr)  # uncropped row-blocks, and the rows kept of the next one
    row = start
    while row < stop:
        c, j = divmod(row, tc)
        n = min(stop - row, tc - j)
        o = out[row - start : row - start + n]
        if whole:  # splitting the last axis of a view is itself a view: the writes land in out
            o[:, : whole * tr].reshape(n, whole, tr)[...] = t[:whole, c, :, j : j + n].transpose(2, 0, 1)
        if rest:
            o[:, whole * tr :] = t[whole, c, :rest, j : j + n].T
        row += n
    return out


def tiles_from_dense(w: Any, grid: tuple[int, int], tile: tuple[int, int], *, transposed: bool = False) -> Any:
    """Cut a matrix into tiles ``[R*C, tr, tc]``, zero in the padding.

    ``w`` is ``[out_dim, in_dim]`` (any size up to the padded one), or ``[in_dim, out_dim]``
    with ``transposed=True`` (the layout ``dense_from_tiles(..., transpose=True)`` gives).
    """
    (R, C), (tr, tc) = grid, tile
    if transposed:
        padded = _zeros_like(w, (C * tc, R * tr))
        padded[: w.shape[0], : w.shape[1]] = w
        out = _permute(padded.reshape(C, tc, R, tr), (2, 0, 3, 1)).reshape(R * C, tr, tc)
    else:
        padded = _zeros_like(w, (R * tr, C * tc))
        padded[: w.shape[0], : w.shape[1]] = w
        out = _permute(padded.reshape(R, tr, C, tc), (0, 2, 1, 3)).reshape(R * C, tr, tc)
    return out.contiguous() if hasattr(out, "contiguous") else np.ascontiguousarray(out)


def worker_block(
    grid: tuple[int, int], tile: tuple[int, int], worker: int, in_dim: int, out_dim: int
) -> tuple[slice, slice]:
    """The real output rows and input columns of ``worker`` (empty slices when all padding)."""
    r, c = divmod(worker, grid[1])
    tr, tc = tile
    rows = slice(min(r * tr, out_dim), min((r + 1) * tr, out_dim))
    cols = slice(min(c * tc, in_dim), min((c + 1) * tc, in_dim))
    return rows, cols


def quantize_rows(tiles: Any) -> tuple[np.ndarray, np.ndarray]:
    """``[W, tr, tc]`` -> (int8 ``[W, tr, tc]``, float32 scales ``[W, tr]``), symmetric per row.

    Accepts numpy (any float dtype, bfloat16 included) or a CPU torch tensor.
    """
    if hasattr(tiles, "detach"):  # torch: numpy has no bfloat16 without ml_dtypes
        tiles = tiles.detach().float().cpu().numpy()
    q = np.empty(tuple(tiles.shape), dtype=np.int8)
    scales = np.empty(tuple(tiles.shape[:-1]), dtype=np.float32)
    at = 0
    for block in blocks(tiles):  # only a block is ever held in float32
        t = np.asarray(block, dtype=np.float32)
        s = _scales(t)
        q[at : at + len(t)] = _quantize(t, s)
        scales[at : at + len(t)] = s
        at += len(t)
    return q, scales


def row_scales(tiles: np.ndarray, qmax: float = QMAX) -> np.ndarray:
    """The float32 scales ``quantize_rows`` gives (shape ``tiles.shape[:-1]``), a block at a time;
    ``qmax`` ``QMAX_INT4``: the scales of 4-bit codes."""
    scales = np.empty(tuple(tiles.shape[:-1]), dtype=np.float32)
    at = 0
    for block in blocks(tiles):
        scales[at : at + len(block)] = _scales(np.asarray(block, dtype=np.float32), qmax)
        at += len(block)
    return scales


def quantize_with_scales(tiles: np.ndarray, scales: np.ndarray, qmax: float = QMAX) -> np.ndarray:
    """The int8 values ``quantize_rows`` gives for ``tiles`` (any block of rows), given their
    scales from ``row_scales``: ``quantize_rows`` is these two, one block at a time."""
    q = np.empty(tuple(tiles.shape), dtype=np.int8)
    at = 0
    for block in blocks(tiles):  # int8 is a quarter of float32: the float32 work, a block at a time
        q[at : at + len(block)] = _quantize(
            np.asarray(block, dtype=np.float32), np.asarray(scales[at : at + len(block)], dtype=np.float32), qmax
        )
        at += len(block)
    return q


def _scales(t: np.ndarray, qmax: float = QMAX) -> np.ndarray:
    amax = np.abs(t).max(axis=-1)
    return np.where(amax > 0, amax / np.float32(qmax), np.float32(1.0)).astype(np.float32)


def _quantize(t: np.ndarray, s: np.ndarray, qmax: float = QMAX) -> np.ndarray:
    # float32 division then round-half-even: the same steps the graph's DequantizeLinear
    # inverts, so dequantize(quantize(t)) is what every backend computes with
    x = t / s[..., None]
    np.rint(x, out=x)
    np.clip(x, -qmax, qmax, out=x)
    return x.astype(np.int8)


def dequantize_rows(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 tiles INT8 tiles stand for: ``q * s`` per row (``scales`` ``[W, tr]``,
    or flat ``[W*tr]``)."""
    q = np.asarray(q)
    s = np.asarray(scales, dtype=np.float32).reshape(q.shape[:-1])
    return q.astype(np.float32) * s[..., None]


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Signed 4-bit codes ``[..., n]`` (``n`` even, values -7..7) -> uint8 ``[..., n/2]``: each
    code stored as ``q + 8`` (the unsigned zero point 8), two to a byte, the even element in the
    low nibble. The one int4 byte layout of the project: ONNX Runtime's ``MatMulNBits`` and
    ``GatherBlockQuantized`` (bits 4, no zero points) read it."""
    u = (np.asarray(codes).astype(np.int16) + 8).astype(np.uint8)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4))


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """``pack_int4`` undone: uint8 ``[..., n/2]`` -> the signed codes ``[..., n]`` as float32."""
    packed = np.asarray(packed)
    codes = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), dtype=np.float32)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return codes - 8.0


def stored_as(tiles: Any, precision: Precision) -> np.ndarray:
    """The tiles as a graph of ``precision`` stores them, back in float32: rounded to the
    precision's weight dtype (float16 for ``fp16``), quantize-dequantize for the int8 precisions
    (int4: the 4-bit codes, one scale per tile row)."""
    t = tiles.detach().float().cpu().numpy() if hasattr(tiles, "detach") else np.asarray(tiles, np.float32)
    if precision is Precision.INT4:
        scales = row_scales(t, QMAX_INT4)
        return dequantize_rows(quantize_with_scales(t, scales, QMAX_INT4), scales)
    if precision.quantized:
        return dequantize_rows(*quantize_rows(t))
    return t.astype(precision.weight_dtype).astype(np.float32)
