"""tools/bench_kernel.py pieces that need no GPU: the bytes-moved floors, and the torch gather
baseline (which the benchmark also uses to check the kernel's output before timing it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prism_deploy.kernel.semantics import tile_dispatch
from tests.tool_helpers import load_tool

bench = load_tool("bench_kernel")

SMALL = bench.Case("small 50->37", 50, 37, 3, 4, 13, 16, 5)


@pytest.mark.parametrize("tile_dtype", ["float32", "float16", "int8"])
def test_gather_baseline_matches_reference(tile_dtype):
    rng = np.random.default_rng(0)
    T, W = 9, SMALL.R * SMALL.C
    x = rng.standard_normal((T, SMALL.in_dim)).astype(np.float32)
    s = rng.standard_normal((T, W)).astype(np.float32)  # continuous: no ties for torch.topk to order
    if tile_dtype == "int8":
        tiles = rng.integers(-127, 128, (W, SMALL.tr, SMALL.tc)).astype(np.int8)
        scales = rng.uniform(1e-3, 2e-3, (W, SMALL.tr)).astype(np.float32)
    else:
        tiles, scales = rng.standard_normal((W, SMALL.tr, SMALL.tc)).astype(tile_dtype), None
    hidden = torch.float32 if tile_dtype == "float32" else torch.float16
    xpad = torch.nn.functional.pad(torch.from_numpy(x), (0, SMALL.C * SMALL.tc - SMALL.in_dim)).to(hidden)
    got = bench.gather_sparse(
        xpad, torch.from_numpy(s), torch.from_numpy(tiles), None if scales is None else torch.from_numpy(scales), SMALL
    )
    ref = tile_dispatch(
        xpad.float().numpy()[:, : SMALL.in_dim],
        s,
        tiles,
        scales,
        R=SMALL.R,
        C=SMALL.C,
        tr=SMALL.tr,
        tc=SMALL.tc,
        top_k=SMALL.top_k,
        gate_scale=1.0,
        out_dim=SMALL.out_dim,
    )
    assert got.shape == (T, SMALL.out_dim) and got.dtype == hidden
    err = bench.relative_error(got, torch.from_numpy(ref))
    assert err < (1e-6 if tile_dtype == "float32" else bench.CHECK_TOLERANCE / 3)
    # the check the benchmark makes would catch a wrong kernel: a dropped worker is far off
    wrong = torch.from_numpy(ref).clone()
    wrong[:, : SMALL.tr] = 0
    assert bench.relative_error(wrong, got) > bench.CHECK_TOLERANCE


def test_floors_count_only_selected_live_bytes():
    case = bench.CASES["square"]
    s = bench.seeded_scores(case, 1, 0)
    f = bench.floor_bytes(case, s, "float16", "float16")
    assert f["distinct_tiles"] == case.top_k  # one token selects exactly top_k tiles
    assert f["tile_bytes"] == case.top_k * case.tr * case.tc * 2  # no padding in the square pipe
    assert f["activation_bytes"] == 4096 * 2 + 512 * 4 + 4096 * 2
    i8 = bench.floor_bytes(case, s, "int8", "float16")
    assert i8["tile_bytes"] == case.top_k * case.tr * (case.tc + 4)  # int8 rows plus a float32 scale each
    # pipe 3: row-blocks past out_dim count only their live rows
    p3 = bench.CASES["pipe3"]
    all_tiles = bench.floor_bytes(p3, bench.seeded_scores(p3, 256, 0), "int8", "float16")
    assert all_tiles["distinct_tiles"] == p3.R * p3.C
    assert all_tiles["tile_bytes"] == p3.out_dim * p3.C * (p3.tc + 4)
