"""A numpy emulation of the CUDA kernel's own algorithm, for tests on machines without a GPU.

It follows ``plugins/tile_dispatch/tile_dispatch.cu`` step by step: the routing's bitwise
threshold search over order-preserving keys, the tie cutoff scanned in index order, the warp
butterfly reductions, the lane/segment layout of each tile row, the skipping of unselected
workers and of padding rows and columns, and float32 accumulation in the kernel's order. The
reference (``prism_deploy.reference``) stays the numerics authority; this emulation lets CI check
the kernel's *algorithm* (selection, ties, padding, grouping) against it, and lets the GPU test
compare the real kernel with what the algorithm should give.

Known difference: ``fmaf`` is emulated as a float64 multiply-add rounded to float32, which can
differ from a true fused multiply-add in the last bit in rare double-rounding cases.
"""

from __future__ import annotations

import numpy as np

from prism_deploy.kernel.spec import TILE_BYTES, TileDispatchSpec

LANES = 32


def order_keys(scores: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys with the same order; -0.0 folded onto +0.0 (as the kernel does)."""
    s = np.where(scores == 0, np.float32(0), scores).astype(np.float32)
    u = s.view(np.uint32)
    return np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000)).astype(np.uint32)


def butterfly_sum(lanes: np.ndarray) -> np.ndarray:
    """The kernel's ``warp_sum_float``: xor-shuffle steps 16, 8, 4, 2, 1 over the last axis (32)."""
    v = lanes.astype(np.float32)
    idx = np.arange(LANES)
    for o in (16, 8, 4, 2, 1):
        v = (v + v[..., idx ^ o]).astype(np.float32)
    return v[..., 0]


def route(scores_row: np.ndarray, top_k: int, gate_scale: float) -> np.ndarray:
    """One token's gate weights ``[W]`` as ``route_token`` computes them."""
    with np.errstate(over="ignore", under="ignore"):  # expf(-inf) = 0, as on the GPU
        return _route(scores_row, top_k, gate_scale)


def _route(scores_row: np.ndarray, top_k: int, gate_scale: float) -> np.ndarray:
    W = scores_row.shape[0]
    per_lane = -(-W // LANES)
    s = np.full(per_lane * LANES, -np.inf, np.float32)
    s[:W] = scores_row
    valid = np.arange(per_lane * LANES) < W
    key = np.where(valid, order_keys(s), np.uint32(0))
    tau = np.uint32(0)
    for bit in range(31, -1, -1):
        cand = np.uint32(tau | np.uint32(1 << bit))
        if int(np.count_nonzero(valid & (key >= cand))) >= top_k:
            tau = cand
    above = int(np.count_nonzero(valid & (key > tau)))
    need = top_k - above
    tied = np.flatnonzero(valid & (key == tau))  # index order
    cutoff = int(tied[need - 1])
    # lane-major layout: lane l holds indices l, l+32, ...; per-lane sums in i order, then butterfly
    grid = s.reshape(per_lane, LANES)  # [i, lane] = index lane + 32*i
    smax = np.float32(np.max(s[:W]))
    sel_grid = (valid & ((key > tau) | ((key == tau) & (np.arange(per_lane * LANES) <= cutoff)))).reshape(per_lane, LANES)
    part = np.zeros(LANES, np.float32)
    for i in range(per_lane):
        e = np.exp((grid[i] - smax).astype(np.float32)).astype(np.float32)
        part = np.where(sel_grid[i], (part + e).astype(np.float32), part)
    denom = butterfly_sum(part)
    sel = sel_grid.reshape(-1)[:W]
    e_all = np.exp((scores_row - smax).astype(np.float32)).astype(np.float32)
    g = np.float32(gate_scale) * (e_all / denom).astype(np.float32)
    return np.where(sel, g, np.float32(0)).astype(np.float32)


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def emulate_kernel(hidden: np.ndarray, scores: np.ndarray, tiles: np.ndarray, scales: np.ndarray | None,
                   spec: TileDispatchSpec, reads: list[tuple[int, int, int, int]] | None = None) -> np.ndarray:
    """``[T, out_dim]`` float32: what the kernel computes (before the cast to the output dtype).

    ``reads``, when given, collects every tile-row range the kernel loads from memory, as
    ``(token_chunk, worker, rows, columns)``.
    """
    x = np.asarray(hidden, dtype=np.float32)
    T, in_dim = x.shape
    R, C, tr, tc = spec.R, spec.C, spec.tr, spec.tc
    t = np.asarray(tiles).reshape(R * C, tr, tc)
    tf = t.astype(np.float32)
    vec = 16 // TILE_BYTES[spec.tile_dtype]
    loads = 64 // vec
    segment = LANES * vec * loads
    g = np.stack([route(np.asarray(scores[i], np.float32), spec.top_k, spec.gate_scale_f32) for i in range(T)])
    out = np.zeros((T, spec.out_dim), np.float32)
    rows_live = min(spec.out_dim, R * tr)
    for r in range(-(-rows_live // tr)):
        nrows = min(tr, spec.out_dim - r * tr)
        acc = np.zeros((T, nrows), np.float32)
        for c in range(C):
            kvalid = min(tc, in_dim - c * tc)
            if kvalid <= 0:
                break
            w = r * C + c
            gw = g[:, w]
            tok = np.flatnonzero(gw != 0)
            if tok.size == 0:
                continue  # the worker's tile is never read
            if reads is not None:
                for chunk in np.unique(tok // spec.tokens_per_block):
                    reads.append((int(chunk), w, nrows, kvalid))
            dot = np.zeros((tok.size, nrows), np.float32)
            for seg in range(-(-tc // segment)):
                if seg * segment >= kvalid:
                    break
                # lane l, load v, element e -> column seg*segment + (v*32 + l)*vec + e
                lane_part = np.zeros((tok.size, nrows, LANES), np.float32)
                for v in range(loads):
                    for e in range(vec):
                        cols = seg * segment + (v * LANES + np.arange(LANES)) * vec + e
                        ok = cols < kvalid
                        cc = np.where(ok, cols, 0)
                        wv = np.where(ok, tf[w, :nrows][:, cc], 0).astype(np.float32)  # [nrows, 32]
                        xv = np.where(ok, x[tok][:, c * tc + cc], 0).astype(np.float32)  # [tok, 32]
                        new = _fma(wv[None], xv[:, None, :], lane_part)
                        lane_part = np.where(ok, new, lane_part)
                dot = (dot + butterfly_sum(lane_part)).astype(np.float32)
            scale = (np.asarray(scales, np.float32).reshape(R * C, tr)[w, :nrows]
                     if spec.tile_dtype == "int8" else np.ones(nrows, np.float32))
            acc[tok] = _fma(gw[tok][:, None], (dot * scale[None]).astype(np.float32), acc[tok])
        out[:, r * tr: r * tr + nrows] = acc
    return out
