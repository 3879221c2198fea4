"""The adapter layout a fit produces: from the tile planner (``prism_deploy.plan``) or a grid."""

from __future__ import annotations

from prism_deploy.core.errors import PrismInputError
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.plan import DEFAULT_WORKERS, plan_three_pipes, plan_tiles


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
    """The config of the adapter to fit.

    ``grid`` gives every pipe that grid with the smallest covering tiles; otherwise one pipe
    comes from ``plan_tiles`` and three pipes from ``plan_three_pipes`` (two 512x512-tile
    pipes and the seed's ``N x K`` pipe). ``gate_scale`` defaults to ``top_k``: a uniform
    gate (softmax = 1/k over the k selected) then gives each selected worker weight exactly 1.
    """
    if pipes not in (1, 3):
        raise PrismInputError(f"--pipes: {pipes} is not 1 or 3")
    n = DEFAULT_WORKERS if workers is None else workers
    if n < 1:
        raise PrismInputError(f"--workers: {n} must be positive")
    if grid is not None:
        r, c = grid
        if r < 1 or c < 1:
            raise PrismInputError(f"--grid: {list(grid)} must be two positive integers")
        layouts: list[tuple[tuple[int, int], tuple[int, int]]] = [((r, c), (-(-out_dim // r), -(-in_dim // c)))] * pipes
    elif pipes == 3:
        layouts = [(p.grid, p.tile) for p in plan_three_pipes(in_dim, out_dim, n).pipes]
    else:
        plan = plan_tiles(in_dim, out_dim, n)
        layouts = [(plan.grid, plan.tile)]
    specs = []
    for i, (g, t) in enumerate(layouts):
        if top_k is not None and not 1 <= top_k <= g[0] * g[1]:
            raise PrismInputError(f"--top-k: {top_k} is out of range [1, {g[0] * g[1]}] for grid {list(g)}")
        scale = (float(top_k) if gate_scale is None else gate_scale) if top_k is not None else 1.0
        specs.append(PipeSpec(f"pipe{i + 1}", (g[0], g[1]), (t[0], t[1]), top_k, scale))
    return AdapterConfig(in_dim, out_dim, tuple(specs))
