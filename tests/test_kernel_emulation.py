"""The kernel's algorithm, emulated in numpy (prism_deploy.kernel.emulate), against the
reference: selection with ties / negative / signed-zero / extreme scores, padding, int8 scales,
batch invariance, and reads limited to the selected tiles. The GPU test compares the real
kernel with this emulation and with the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prism_deploy.kernel.emulate import emulate_kernel, order_keys, route
from prism_deploy.kernel.semantics import gate_weights, tile_dispatch
from prism_deploy.kernel.spec import TileDispatchSpec
from prism_deploy.reference import random_adapter, simple_config, top_k_indices
from prism_deploy.reference.routing import route as reference_route

HARD = np.array([
    [-3.0, -1.0, -1.0, -2.0, -1.0, -5.0, -1.0, -7.0],
    [0.0, -0.0, 0.0, -0.0, 1.0, 0.0, -0.0, -1.0],
    [2.0] * 8,
    [3e38, -3e38, 3.0, 3e38, 0.0, -3.0, 1e-38, -1e-38],
    [1.0, np.nextafter(np.float32(1), np.float32(2)), 1.0, 1.0, 0.5, 0.5, 0.5, 0.5],
], dtype=np.float32)


def test_order_keys_preserve_float_order():
    vals = np.array([-np.inf, -3e38, -1.0, -1e-38, -0.0, 0.0, 1e-38, 1.0, 3e38, np.inf], np.float32)
    keys = order_keys(vals)
    assert (np.diff(keys.astype(np.int64)) >= 0).all()
    assert keys[4] == keys[5]  # -0.0 == +0.0


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_routing_matches_reference_on_hard_scores(k):
    for row in HARD:
        g = route(row, k, 1.3)
        ref = reference_route(torch.from_numpy(row[None]), torch.eye(8), torch.zeros(8), k, 1.3)
        assert set(np.flatnonzero(g != 0)) <= set(top_k_indices(torch.from_numpy(row[None]), k)[0].tolist())
        np.testing.assert_allclose(g, ref.dense[0].numpy(), rtol=2e-6, atol=0)


def test_routing_matches_reference_on_random_scores():
    rng = np.random.default_rng(1)
    for W, k in [(1, 1), (31, 7), (32, 32), (33, 1), (100, 50), (512, 154)]:
        s = rng.standard_normal((4, W)).astype(np.float32)
        s[:, ::3] = np.round(s[:, ::3], 1)  # plenty of ties
        ours = np.stack([route(r, k, 0.7) for r in s])
        np.testing.assert_allclose(ours, gate_weights(s, k, 0.7), rtol=2e-6, atol=0)


CASES = [
    # R, C, tr, tc, top_k, in_dim, out_dim, tile dtype
    (3, 4, 10, 10, 5, 37, 29, "float32"),      # padding rows and columns
    (2, 3, 7, 300, 1, 850, 13, "float16"),     # top_k = 1, tc over one 16-byte vector set, padding row-block
    (4, 2, 5, 40, 8, 70, 20, "int8"),          # top_k = R*C
    (1, 5, 3, 13, 5, 40, 3, "float32"),        # tc not a multiple of the vector, whole column blocks in padding
    (2, 2, 8, 2100, 2, 4000, 16, "float16"),   # tc over one segment (2048 half columns)
]


@pytest.mark.parametrize("case", CASES)
def test_emulated_kernel_matches_reference(case):
    R, C, tr, tc, k, in_dim, out_dim, td = case
    rng = np.random.default_rng(sum(case[:7]))
    spec = TileDispatchSpec(R, C, tr, tc, k, 1.7, out_dim, "float32", td)
    T = 6
    x = rng.standard_normal((T, in_dim)).astype(np.float32)
    s = rng.standard_normal((T, R * C)).astype(np.float32)
    if td == "int8":
        tiles = rng.integers(-127, 128, (R * C, tr, tc)).astype(np.int8)
        scales = rng.uniform(0.01, 0.02, (R * C, tr)).astype(np.float32)
    else:
        tiles, scales = rng.standard_normal((R * C, tr, tc)).astype(td), None
    reads: list = []
    y = emulate_kernel(x, s, tiles, scales, spec, reads=reads)
    ref = tile_dispatch(x, s, tiles, scales, R=R, C=C, tr=tr, tc=tc, top_k=k, gate_scale=1.7, out_dim=out_dim)
    assert np.linalg.norm(y - ref) <= 1e-6 * np.linalg.norm(ref)
    # reads: only selected workers, each at most once per token chunk, never padding rows/columns
    selected = set(np.flatnonzero(gate_weights(s, k, 1.7).any(axis=0)))
    workers = [w for _, w, _, _ in reads]
    assert set(workers) <= selected and len(reads) == len(set((c, w) for c, w, _, _ in reads))
    for _, w, rows, cols in reads:
        r, c = divmod(w, C)
        assert rows == min(tr, out_dim - r * tr) > 0 and cols == min(tc, in_dim - c * tc) > 0
    # batch invariance: a token alone gives bit-identical results
    for i in (0, T - 1):
        np.testing.assert_array_equal(emulate_kernel(x[i:i + 1], s[i:i + 1], tiles, scales, spec)[0], y[i])


def test_emulated_kernel_matches_reference_adapter_pipe():
    adapter = random_adapter(simple_config(45, 33, (3, 5), top_k=4, gate_scale=2.0), seed=7)
    pipe = adapter.pipe_list()[0]
    x = torch.randn(5, 45, generator=torch.Generator().manual_seed(2))
    routing = pipe.routing(x)
    sp = pipe.spec
    spec = TileDispatchSpec(*sp.grid, *sp.tile, sp.top_k, sp.gate_scale, 33)
    y = emulate_kernel(x.numpy(), routing.scores.numpy(), pipe.tiles.detach().numpy(), None, spec)
    ref = pipe(x).numpy()
    assert np.linalg.norm(y - ref) <= 1e-6 * np.linalg.norm(ref)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(
    R=st.integers(1, 4), C=st.integers(1, 6), tr=st.integers(1, 9), tc=st.integers(1, 40),
    T=st.integers(1, 5), k_frac=st.floats(0, 1), pad_in=st.integers(0, 39), pad_out=st.integers(0, 8),
    tile_dtype=st.sampled_from(["float32", "float16", "int8"]), tie_step=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_emulated_kernel_matches_reference_property(R, C, tr, tc, T, k_frac, pad_in, pad_out, tile_dtype,
                                                    tie_step, seed):
    """Random grids with padding on both sides, every top_k, coarse scores (many ties)."""
    in_dim = max(1, C * tc - min(pad_in, tc - 1))
    out_dim = max(1, R * tr - min(pad_out, tr - 1))
    k = 1 + int(k_frac * (R * C - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, in_dim)).astype(np.float32)
    s = rng.standard_normal((T, R * C)).astype(np.float32)
    if tie_step:
        s = (np.round(s / tie_step) * tie_step).astype(np.float32)
    if tile_dtype == "int8":
        tiles = rng.integers(-127, 128, (R * C, tr, tc)).astype(np.int8)
        scales = rng.uniform(0.01, 0.02, (R * C, tr)).astype(np.float32)
    else:
        tiles, scales = rng.standard_normal((R * C, tr, tc)).astype(tile_dtype), None
    spec = TileDispatchSpec(R, C, tr, tc, k, 0.9, out_dim, "float32", tile_dtype)
    y = emulate_kernel(x, s, tiles, scales, spec)
    ref = tile_dispatch(x, s, tiles, scales, R=R, C=C, tr=tr, tc=tc, top_k=k, gate_scale=0.9, out_dim=out_dim)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
