"""The adapter layout a fit produces: from the tile planner (``prism_deploy.plan``) or a grid.

A layout whose pipes are mostly padding is refused unless the caller says what to do with it
(``padding``): the seed's three-pipe layout on a small map is 99.98 % padding at 256 -> 160
(1.07 GB of tiles for 40,960 weights, 27 minutes and more of gated fitting). Refusing, with
the numbers and the flag that adapts it, leaves what was asked for unchanged unless the user
chooses; ``adapt`` re-plans only the padded pipes and says how (docs/fitting.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.tiles import covering_tile, padding_worker_count
from prism_deploy.core.units import human_bytes
from prism_deploy.fit.option_ranges import check_number
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.plan import DEFAULT_WORKERS, MAX_WORKERS, plan_three_pipes, plan_tiles

PaddingPolicy = Literal["refuse", "adapt", "keep"]
PADDING_POLICIES = ("refuse", "adapt", "keep")
# A pipe is "mostly padding" when more than half of its tile weights multiply padded input
# columns or write discarded output rows: most of its bytes and per-token work are then
# zeros. The planner's own one-pipe rule stays far below at ordinary widths (0 at
# 4096 -> 4096, 30 % at 100 -> 100 with 512 workers); the seed's 512x512-tile pipes on a map
# smaller than their tiles are above 99 %.
MOSTLY_PADDING = 0.5

Layout = tuple[tuple[int, int], tuple[int, int]]  # (grid, tile)


@dataclass(frozen=True)
class FitLayout:
    config: AdapterConfig
    notes: tuple[str, ...] = ()  # what ``padding="adapt"`` changed, one sentence per pipe


def padding_fraction(grid: tuple[int, int], tile: tuple[int, int], in_dim: int, out_dim: int) -> float:
    """The share of a pipe's tile weights that lie in the padding (``1 - in*out / (R*tr*C*tc)``)."""
    return 1.0 - (in_dim * out_dim) / (grid[0] * tile[0] * grid[1] * tile[1])


def fit_config(
    in_dim: int,
    out_dim: int,
    *,
    workers: int | None = None,
    grid: tuple[int, int] | None = None,
    pipes: int = 1,
    top_k: int | None = None,
    gate_scale: float | None = None,
    padding: PaddingPolicy = "refuse",
    dtype_bytes: int = 4,
) -> AdapterConfig:
    """The config of the adapter to fit (``fit_layout(...).config``)."""
    return fit_layout(
        in_dim,
        out_dim,
        workers=workers,
        grid=grid,
        pipes=pipes,
        top_k=top_k,
        gate_scale=gate_scale,
        padding=padding,
        dtype_bytes=dtype_bytes,
    ).config


def fit_layout(
    in_dim: int,
    out_dim: int,
    *,
    workers: int | None = None,
    grid: tuple[int, int] | None = None,
    pipes: int = 1,
    top_k: int | None = None,
    gate_scale: float | None = None,
    padding: PaddingPolicy = "refuse",
    dtype_bytes: int = 4,
) -> FitLayout:
    """The layout to fit, after the padding policy.

    ``grid`` gives every pipe that grid with the smallest covering tiles; otherwise one pipe
    comes from ``plan_tiles`` and three pipes from ``plan_three_pipes`` (two 512x512-tile
    pipes and the seed's ``N x K`` pipe). ``gate_scale`` defaults to ``top_k``: a uniform
    gate (softmax = 1/k over the k selected) then gives each selected worker weight exactly 1.

    Pipes with more than ``MOSTLY_PADDING`` of their weights in the padding: ``refuse`` raises
    ``PrismInputError`` with the numbers and the flags; ``adapt`` re-plans each such pipe with
    ``plan_tiles`` for its worker count, halved until the layout is at most half padding,
    and returns a note per pipe; ``keep`` fits the layout as given.
    """
    if pipes not in (1, 3):
        raise PrismInputError(f"--pipes: {pipes} is not 1 or 3")
    if padding not in PADDING_POLICIES:
        raise PrismInputError(f"--mostly-padding: {padding!r} is not one of {', '.join(PADDING_POLICIES)}")
    n = DEFAULT_WORKERS if workers is None else int(check_number("workers", workers))
    by = f"--workers {n}" if workers is not None else f"the default {n} workers"
    if top_k is not None:
        check_number("top_k", top_k)
    if gate_scale is not None:
        check_number("gate_scale", gate_scale)
    if grid is not None:
        r, c = (int(check_number("grid", v)) for v in grid)
        if r * c > MAX_WORKERS:
            raise PrismInputError(
                f"--grid: {r} x {c} = {r * c} workers is more than the planner handles ({MAX_WORKERS})"
            )
        layouts: list[Layout] = [((r, c), covering_tile((r, c), in_dim, out_dim))] * pipes
        asked = f"--grid {r} {c}"
    elif pipes == 3:
        layouts = [(p.grid, p.tile) for p in plan_three_pipes(in_dim, out_dim, n).pipes]
        asked = f"--pipes 3 ({by} per pipe)"
    else:
        plan = plan_tiles(in_dim, out_dim, n)
        layouts = [(plan.grid, plan.tile)]
        asked = f"the planner's layout for {by}"
    notes: list[str] = []
    padded = [i for i, (g, t) in enumerate(layouts) if padding_fraction(g, t, in_dim, out_dim) > MOSTLY_PADDING]
    if padded and padding == "refuse":
        raise PrismInputError(_refusal(asked, layouts, padded, in_dim, out_dim, top_k, dtype_bytes))
    if padded and padding == "adapt":
        for i in padded:
            new = adapted_layout(layouts[i], in_dim, out_dim)
            notes.append(
                f"pipe{i + 1}: {_describe(layouts[i], in_dim, out_dim)} re-planned as "
                f"{_describe(new, in_dim, out_dim)} (--mostly-padding adapt)"
            )
            layouts[i] = new
    specs = []
    for i, (g, t) in enumerate(layouts):
        if top_k is not None and not 1 <= top_k <= g[0] * g[1]:
            raise PrismInputError(
                f"--top-k: {top_k} is out of range [1, {g[0] * g[1]}] for grid {list(g)}"
                + (" (re-planned by --mostly-padding adapt)" if i in padded and padding == "adapt" else "")
            )
        scale = (float(top_k) if gate_scale is None else gate_scale) if top_k is not None else 1.0
        specs.append(PipeSpec(f"pipe{i + 1}", (g[0], g[1]), (t[0], t[1]), top_k, scale))
    return FitLayout(AdapterConfig(in_dim, out_dim, tuple(specs)), tuple(notes))


def adapted_layout(layout: Layout, in_dim: int, out_dim: int) -> Layout:
    """The planner's rule (about-square smallest covering tiles) for the pipe's worker count,
    halved until at most ``MOSTLY_PADDING`` of the weights are padding (one worker has none)."""
    n = layout[0][0] * layout[0][1]
    while True:
        plan = plan_tiles(in_dim, out_dim, n)
        if n == 1 or padding_fraction(plan.grid, plan.tile, in_dim, out_dim) <= MOSTLY_PADDING:
            return plan.grid, plan.tile
        n //= 2


def _refusal(
    asked: str, layouts: list[Layout], padded: list[int], in_dim: int, out_dim: int, top_k: int | None, dtype_bytes: int
) -> str:
    groups: dict[Layout, list[int]] = {}
    for i in padded:
        groups.setdefault(layouts[i], []).append(i)
    parts = []
    for layout, idx in groups.items():
        (R, C), _ = layout
        names = " and ".join(f"pipe{i + 1}" for i in idx)
        verb = "are" if len(idx) > 1 else "is"
        parts.append(
            f"{names} ({_grid(layout)}) {verb} {padding_fraction(*layout, in_dim, out_dim):.2%} padding, "
            f"{padding_worker_count(*layout, in_dim, out_dim)} of {R * C} workers holding no real weight"
        )
    params = sum(g[0] * t[0] * g[1] * t[1] for g, t in layouts)
    gates = sum(g[0] * g[1] * (in_dim + 1) for g, _ in layouts) if top_k is not None else 0
    size = (params + gates) * dtype_bytes
    plans: dict[Layout, list[int]] = {}
    for i in padded:
        plans.setdefault(adapted_layout(layouts[i], in_dim, out_dim), []).append(i)
    adapted = "; ".join(
        f"{' and '.join(f'pipe{i + 1}' for i in idx)} to {_grid(layout)}" for layout, idx in plans.items()
    )
    return (
        f"{asked} on {in_dim} -> {out_dim}: {'; '.join(parts)}; the adapter would be {human_bytes(size)} "
        f"for a map of {in_dim * out_dim:,} weights. Refused before computing: --mostly-padding adapt "
        f"re-plans {'them' if len(padded) > 1 else 'it'} ({adapted}), --mostly-padding keep fits the layout as planned"
    )


def _describe(layout: Layout, in_dim: int, out_dim: int) -> str:
    return f"{_grid(layout)} ({padding_fraction(*layout, in_dim, out_dim):.2%} padding)"


def _grid(layout: Layout) -> str:
    (R, C), (tr, tc) = layout
    return f"{R}x{C} of {tr}x{tc} tiles"
