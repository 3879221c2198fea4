"""The adapter layout a fit produces: from the tile planner, or an explicit grid."""

from __future__ import annotations

import math
from typing import Any

from prism_deploy.errors import PrismInputError
from prism_deploy.format import AdapterConfig, PipeSpec


def plan_grid(in_dim: int, out_dim: int, num_workers: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(grid, tile)`` for ``num_workers`` workers, from ``prism_deploy.plan`` when present."""
    try:
        from prism_deploy.plan import plan_tiles  # written on another branch (issue 2, section 3)
    except ImportError:
        plan_tiles = None
    if plan_tiles is not None:
        plan: Any = plan_tiles(in_dim, out_dim, num_workers)
        return tuple(plan.grid), tuple(plan.tile)  # type: ignore[return-value]
    return _fallback_plan(in_dim, out_dim, num_workers)


def _fallback_plan(in_dim: int, out_dim: int, n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # TEMPORARY until prism_deploy.plan lands on main: the factor pair R*C = n whose tiles
    # are closest to square, ties toward more column blocks; ceil division covers the dims.
    best = None
    for c in range(1, n + 1):
        if n % c:
            continue
        r = n // c
        tile = (-(-out_dim // r), -(-in_dim // c))
        score = (abs(math.log(tile[0] / tile[1])), -c)
        if best is None or score < best[0]:
            best = (score, (r, c), tile)
    assert best is not None
    return best[1], best[2]


def fit_config(
    in_dim: int,
    out_dim: int,
    *,
    workers: int | None = None,
    grid: tuple[int, int] | None = None,
    pipes: int = 1,
    top_k: int | None = None,
    gate_scale: float | None = None,
) -> AdapterConfig:
    """The config of the adapter to fit. ``gate_scale`` defaults to ``top_k``: a uniform gate
    (softmax = 1/k over the k selected) then gives each selected worker weight exactly 1."""
    if pipes not in (1, 3):
        raise PrismInputError(f"--pipes: {pipes} is not 1 or 3")
    if grid is not None:
        r, c = grid
        if r < 1 or c < 1:
            raise PrismInputError(f"--grid: {list(grid)} must be two positive integers")
        layouts = [((r, c), (-(-out_dim // r), -(-in_dim // c)))] * pipes
    elif pipes == 3:
        layouts = _three_pipe_layouts(in_dim, out_dim, workers or 512)
    else:
        n = workers or 512
        if n < 1:
            raise PrismInputError(f"--workers: {n} must be positive")
        layouts = [plan_grid(in_dim, out_dim, n)]
    specs = []
    for i, (g, t) in enumerate(layouts):
        if top_k is not None and not 1 <= top_k <= g[0] * g[1]:
            raise PrismInputError(f"--top-k: {top_k} is out of range [1, {g[0] * g[1]}] for grid {list(g)}")
        scale = (float(top_k) if gate_scale is None else gate_scale) if top_k is not None else 1.0
        specs.append(PipeSpec(f"pipe{i + 1}", g, t, top_k, scale))
    return AdapterConfig(in_dim, out_dim, tuple(specs))


def _three_pipe_layouts(in_dim: int, out_dim: int, workers: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    try:
        from prism_deploy.plan import plan_three_pipes  # type: ignore[attr-defined]
    except ImportError:
        # TEMPORARY: until the planner's 3-pipe layout lands, three copies of the one-pipe plan.
        return [plan_grid(in_dim, out_dim, workers)] * 3
    plans = plan_three_pipes(in_dim, out_dim)
    return [(tuple(p.grid), tuple(p.tile)) for p in plans]  # type: ignore[misc]
