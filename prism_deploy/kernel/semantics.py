"""The tile-dispatch op in numpy: the reference semantics of one gated pipe, in float32.

Used by the ONNX Runtime twin of the ``prism::tile_dispatch`` node and by tests. It follows
the PyTorch reference (``prism_deploy.reference``), not the CUDA kernel's loop order: the
reference is the numerics authority, and both the kernel and this function are checked
against it.
"""

from __future__ import annotations

import numpy as np

from prism_deploy.core.tiles import dequantize_rows


def top_k_select(scores: np.ndarray, top_k: int) -> np.ndarray:
    """``[T, k]`` indices of the ``top_k`` largest scores per row, ties toward the lower index.

    A stable sort of the negated scores keeps equal scores in index order, as ONNX TopK and
    ``prism_deploy.reference.top_k_indices`` do. -0.0 and +0.0 compare equal there too.
    """
    s = np.asarray(scores, dtype=np.float32)
    order = np.argsort(-s, axis=-1, kind="stable")
    return order[..., :top_k]


def gate_weights(scores: np.ndarray, top_k: int, gate_scale: float) -> np.ndarray:
    """``[T, W]``: ``gate_scale * softmax`` over each row's top-k scores, zero elsewhere."""
    s = np.asarray(scores, dtype=np.float32)
    idx = top_k_select(s, top_k)
    sel = np.take_along_axis(s, idx, axis=-1)
    with np.errstate(over="ignore"):  # -3e38 - 3e38 = -inf, and exp(-inf) = 0 is what is meant
        e = np.exp(sel - sel.max(axis=-1, keepdims=True))
    w = (e / e.sum(axis=-1, keepdims=True)) * np.float32(gate_scale)
    dense = np.zeros_like(s)
    np.put_along_axis(dense, idx, w.astype(np.float32), axis=-1)
    return dense


def tile_dispatch(
    hidden: np.ndarray,
    scores: np.ndarray,
    tiles: np.ndarray,
    scales: np.ndarray | None,
    *,
    R: int,
    C: int,
    tr: int,
    tc: int,
    top_k: int,
    gate_scale: float,
    out_dim: int,
) -> np.ndarray:
    """``hidden`` ``[T, in_dim]``, ``scores`` ``[T, R*C]`` -> the pipe's output ``[T, out_dim]`` float32."""
    x = np.asarray(hidden, dtype=np.float32)
    T, in_dim = x.shape
    if in_dim > C * tc:
        raise ValueError(f"hidden has {in_dim} columns, more than C*tc={C * tc}")
    g = gate_weights(scores, top_k, gate_scale).reshape(T, R, C)
    xp = np.zeros((T, C, tc), dtype=np.float32)
    xp.reshape(T, C * tc)[:, :in_dim] = x
    t = np.asarray(tiles).reshape(R * C, tr, tc)
    if t.dtype == np.int8 and scales is None:
        raise ValueError("int8 tiles need scales of shape [R*C, tr]")
    w = (dequantize_rows(t, scales) if scales is not None and t.dtype == np.int8 else t.astype(np.float32)).reshape(
        R, C, tr, tc
    )
    # As the reference: scale each token's column blocks by the gate of the worker reading
    # them, then one product per row-block whose reduction runs over all C*tc columns.
    scaled = g[:, :, :, None] * xp[:, None, :, :]  # [T, R, C, tc]
    y = np.einsum("trck,rcik->tri", scaled, w, optimize=True).reshape(T, R * tr)
    return np.ascontiguousarray(y[:, :out_dim], dtype=np.float32)


def random_inputs(
    rng: np.random.Generator,
    T: int,
    in_dim: int,
    R: int,
    C: int,
    tr: int,
    tc: int,
    tile_dtype: str,
    hidden_dtype: str = "float32",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Random ``(hidden, scores, tiles, scales)`` for the op, drawn in that order (tests, tools).

    Tiles are scaled by ``1/sqrt(in_dim)`` so outputs stay O(1) at any width; int8 tiles take
    the full [-127, 127] range with float32 row scales of the same overall size.
    """
    x = rng.standard_normal((T, in_dim)).astype(hidden_dtype)
    s = rng.standard_normal((T, R * C)).astype(np.float32)
    if tile_dtype == "int8":
        tiles = rng.integers(-127, 128, (R * C, tr, tc)).astype(np.int8)
        # cast after dividing: np.sqrt gives a float64 scalar, which would make the scales float64
        scales = (rng.uniform(0.5, 1.0, (R * C, tr)) / (127 * np.sqrt(in_dim))).astype(np.float32)
        return x, s, tiles, scales
    return x, s, (rng.standard_normal((R * C, tr, tc)) / np.sqrt(in_dim)).astype(tile_dtype), None
