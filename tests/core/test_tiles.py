"""The tile arithmetic of ``core.tiles`` against the definitions it stands for, counted one by one."""

from __future__ import annotations

import itertools
import math

from prism_deploy.core.tiles import (
    ceil_div,
    covering_tile,
    padded_shape,
    padding_worker_count,
    real_blocks,
    real_workers,
)
from prism_deploy.format import PipeSpec


def test_ceil_div_is_the_ceiling_without_floats():
    for a, b in itertools.product(range(40), range(1, 9)):
        assert ceil_div(a, b) == math.ceil(a / b)
    big = (1 << 62) + 1  # past float64's exact integers
    assert ceil_div(big, 2) == (1 << 61) + 1


def test_covering_tile_is_the_smallest_that_covers():
    for (R, C), in_dim, out_dim in itertools.product([(1, 1), (2, 3), (4, 2)], [1, 5, 9], [1, 7, 12]):
        tr, tc = covering_tile((R, C), in_dim, out_dim)
        rows, cols = padded_shape((R, C), (tr, tc))
        assert rows >= out_dim and cols >= in_dim
        assert R * (tr - 1) < out_dim and C * (tc - 1) < in_dim


def test_worker_counts_match_the_listed_padding_workers():
    for grid, tile, in_dim, out_dim in itertools.product(
        [(1, 1), (3, 2), (4, 4)], [(1, 1), (2, 3), (5, 2)], range(1, 12, 3), range(1, 12, 4)
    ):
        spec = PipeSpec("p", grid, tile)
        listed = spec.padding_workers(in_dim, out_dim)
        assert padding_worker_count(grid, tile, in_dim, out_dim) == len(listed)
        assert real_workers(grid, tile, in_dim, out_dim) == spec.workers - len(listed)
        # a block is real exactly when its first index is inside the dim
        assert real_blocks(out_dim, tile[0]) == sum(1 for r in range(out_dim + 1) if r * tile[0] < out_dim)
