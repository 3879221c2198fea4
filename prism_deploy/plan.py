"""The tile planner: which grid of which tiles covers an ``in_dim -> out_dim`` map.

``plan_tiles`` is the seed's "universal tile size calculation" read as a rule (docs/planner.md):
among the factor pairs ``R x C`` of the worker count, take the one whose ratio ``R/C`` is
closest to the map's aspect ``out_dim/in_dim``, then the smallest tiles that cover the dims
(``tr = ceil(out/R)``, ``tc = ceil(in/C)``). The closest ratio makes tiles about square, so
each worker does a balanced share of input and output. Pairs that leave a whole row-block
or column-block in the padding are passed over when another pair has none.

``plan_three_pipes`` lays out the seed's three parallel pipes: two "cubic" pipes of 512x512
tiles and a third of power-of-two ``N x K`` tiles. It reports, rather than hides, where the
seed's sketch cannot be followed (a cubic pipe that cannot cover the dims with the requested
worker count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.tiles import (
    ceil_div,
    covering_tile,
    padded_shape,
    padding_worker_count,
)
from prism_deploy.format import AdapterConfig, PipeSpec

DEFAULT_WORKERS = 512
MAX_WORKERS = 1 << 24  # far beyond any real grid; keeps factoring instant
CUBIC_TILE = 512


@dataclass(frozen=True)
class TilePlan:
    """A grid of ``R x C`` workers with ``tr x tc`` tiles covering ``in_dim -> out_dim``."""

    in_dim: int
    out_dim: int
    grid: tuple[int, int]  # (R row-blocks over the output, C column-blocks over the input)
    tile: tuple[int, int]  # (tr output rows, tc input columns)
    requested_workers: int  # the worker count asked for; ``workers`` differs only if noted
    notes: tuple[str, ...] = field(default=())

    @property
    def workers(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def aspect(self) -> float:
        return self.out_dim / self.in_dim

    @property
    def padded_out(self) -> int:
        return padded_shape(self.grid, self.tile)[0]

    @property
    def padded_in(self) -> int:
        return padded_shape(self.grid, self.tile)[1]

    @property
    def padding_rows(self) -> int:
        return self.padded_out - self.out_dim

    @property
    def padding_cols(self) -> int:
        return self.padded_in - self.in_dim

    @property
    def padding_workers(self) -> int:
        """Workers whose tile lies wholly in the padding (they compute nothing useful)."""
        return padding_worker_count(self.grid, self.tile, self.in_dim, self.out_dim)

    @property
    def covers(self) -> bool:
        return self.padded_out >= self.out_dim and self.padded_in >= self.in_dim

    def to_pipe_spec(self, name: str, top_k: int | None = None, gate_scale: float = 1.0) -> PipeSpec:
        return PipeSpec(name, self.grid, self.tile, top_k, gate_scale)

    def to_json(self) -> dict[str, Any]:
        return {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "requested_workers": self.requested_workers,
            "grid": list(self.grid),
            "tile": list(self.tile),
            "workers": self.workers,
            "padded_in": self.padded_in,
            "padded_out": self.padded_out,
            "padding_rows": self.padding_rows,
            "padding_cols": self.padding_cols,
            "padding_workers": self.padding_workers,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class ThreePipePlan:
    """The seed's three parallel pipes: two cubic (512x512 tiles) and one ``N x K``."""

    in_dim: int
    out_dim: int
    requested_workers: int
    pipes: tuple[TilePlan, TilePlan, TilePlan]
    cubic_covers_with_requested_workers: bool

    def to_config(self, top_k: int | None = None, combine: str = "sum") -> AdapterConfig:
        """An adapter config with the three pipes (``top_k`` for each, capped at its workers)."""
        specs = tuple(
            plan.to_pipe_spec(f"pipe{i + 1}", None if top_k is None else min(top_k, plan.workers))
            for i, plan in enumerate(self.pipes)
        )
        return AdapterConfig(self.in_dim, self.out_dim, specs, combine)

    def to_json(self) -> dict[str, Any]:
        return {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "requested_workers": self.requested_workers,
            "cubic_covers_with_requested_workers": self.cubic_covers_with_requested_workers,
            "pipes": [dict(p.to_json(), name=f"pipe{i + 1}") for i, p in enumerate(self.pipes)],
        }


def factor_pairs(n: int) -> list[tuple[int, int]]:
    """Every ``(R, C)`` with ``R * C == n``, in increasing ``R``."""
    small = [r for r in range(1, math.isqrt(n) + 1) if n % r == 0]
    rows = sorted(set(small) | {n // r for r in small})
    return [(r, n // r) for r in rows]


def next_pow2(x: int) -> int:
    """The smallest power of two ``>= x`` (``x >= 1``); exact on integers, no float log."""
    return 1 << (x - 1).bit_length()


def plan_tiles(in_dim: int, out_dim: int, num_workers: int = DEFAULT_WORKERS) -> TilePlan:
    """The seed's rule: factor pair closest to the aspect, smallest covering tiles.

    Ties in ``|R/C - aspect|`` go to the smaller ``R`` (the first pair in increasing ``R``).
    """
    _check_dims(in_dim, out_dim, num_workers)
    aspect = out_dim / in_dim

    def candidate(pair: tuple[int, int]) -> TilePlan:
        return TilePlan(in_dim, out_dim, pair, covering_tile(pair, in_dim, out_dim), num_workers)

    def distance(plan: TilePlan) -> float:
        return abs(plan.grid[0] / plan.grid[1] - aspect)

    candidates = [candidate(p) for p in factor_pairs(num_workers)]
    closest = min(candidates, key=distance)  # min keeps the first of equals: smaller R
    clean = [p for p in candidates if p.padding_workers == 0]
    notes = []
    if clean:
        best = min(clean, key=distance)
        if best.grid != closest.grid:
            notes.append(
                f"the closest ratio, {_grid(closest.grid)} of {_grid(closest.tile)} tiles, leaves "
                f"{closest.padding_workers} worker(s) wholly in the padding; {_grid(best.grid)} has none"
            )
    else:
        best = closest
        notes.append(
            f"every factor pair of {num_workers} leaves workers wholly in the padding; "
            f"{best.padding_workers} of {num_workers} compute nothing useful "
            f"(fewer workers would avoid it)"
        )
    return TilePlan(in_dim, out_dim, best.grid, best.tile, num_workers, tuple(notes))


def plan_cubic_pipe(in_dim: int, out_dim: int, num_workers: int = DEFAULT_WORKERS, tile: int = CUBIC_TILE) -> TilePlan:
    """A pipe of ``num_workers`` square ``tile x tile`` workers (the seed's pipes 1 and 2).

    Among the factor pairs that cover the dims, prefer those without all-padding workers,
    then the ratio closest to the aspect. If none covers, the tile shape is kept and the
    grid grows to the smallest that covers (``ceil(out/tile) x ceil(in/tile)``): the worker
    count then differs from the one asked for, and a note says so.
    """
    _check_dims(in_dim, out_dim, num_workers)
    aspect = out_dim / in_dim
    covering = [
        TilePlan(in_dim, out_dim, pair, (tile, tile), num_workers)
        for pair in factor_pairs(num_workers)
        if pair[0] * tile >= out_dim and pair[1] * tile >= in_dim
    ]
    if covering:
        best = min(covering, key=lambda p: (p.padding_workers > 0, abs(p.grid[0] / p.grid[1] - aspect)))
        notes: tuple[str, ...] = ()
        if best.padding_workers:
            notes = (
                f"{best.padding_workers} of {best.workers} workers lie wholly in the padding: "
                f"{num_workers} tiles of {tile}x{tile} hold more than the {out_dim}x{in_dim} map needs",
            )
        return TilePlan(in_dim, out_dim, best.grid, best.tile, num_workers, notes)
    R, C = ceil_div(out_dim, tile), ceil_div(in_dim, tile)
    # The grid the seed gives all three pipes (its layer-3 rule), to show how far short it falls.
    seed_pair = _layer3_grid(out_dim, num_workers)
    note = (
        f"no grid of {num_workers} workers with {tile}x{tile} tiles covers {in_dim} -> {out_dim}: "
        f"it needs at least {R}x{C} = {R * C} workers (the seed's {_grid(seed_pair)} spans only "
        f"{seed_pair[0] * tile} output rows and {seed_pair[1] * tile} input columns); "
        f"nearest covering grid: {_grid((R, C))} = {R * C} workers"
    )
    return TilePlan(in_dim, out_dim, (R, C), (tile, tile), num_workers, (note,))


def plan_layer3_pipe(in_dim: int, out_dim: int, num_workers: int = DEFAULT_WORKERS) -> TilePlan:
    """The seed's "Dimension Calculation for Layer 3", as its code and example compute it.

    The grid is the factor pair of ``num_workers`` closest to ``out_dim / 512`` (the seed's
    literal aspect, which is what yields its 256x2 example for 4096 -> 128256), and the
    tiles are the next powers of two of the covering tile: ``N = next_pow2(ceil(out/R))``,
    ``K = next_pow2(ceil(in/C))``.
    """
    _check_dims(in_dim, out_dim, num_workers)
    aspect = out_dim / CUBIC_TILE
    R, C = _layer3_grid(out_dim, num_workers)
    plan = TilePlan(in_dim, out_dim, (R, C), _pow2_tile((R, C), in_dim, out_dim), num_workers)
    notes = [
        f"grid chosen by the seed's literal aspect out_dim/512 = {aspect:.4g}, not out/in = {out_dim / in_dim:.4g}"
    ]
    if plan.padding_workers:
        alternatives = [
            p
            for p in (
                TilePlan(in_dim, out_dim, pair, _pow2_tile(pair, in_dim, out_dim), num_workers)
                for pair in factor_pairs(num_workers)
            )
            if p.padding_workers == 0
        ]
        msg = f"{plan.padding_workers} worker(s) lie wholly in the power-of-two padding"
        if alternatives:
            alt = min(alternatives, key=lambda p: abs(p.grid[0] / p.grid[1] - aspect))
            msg += f"; {_grid(alt.grid)} of {_grid(alt.tile)} tiles would have none"
        notes.append(msg)
    return TilePlan(plan.in_dim, plan.out_dim, plan.grid, plan.tile, num_workers, tuple(notes))


def plan_three_pipes(in_dim: int, out_dim: int, num_workers: int = DEFAULT_WORKERS) -> ThreePipePlan:
    """Pipes 1 and 2: cubic (512x512 tiles); pipe 3: the seed's power-of-two ``N x K``."""
    cubic = plan_cubic_pipe(in_dim, out_dim, num_workers)
    layer3 = plan_layer3_pipe(in_dim, out_dim, num_workers)
    return ThreePipePlan(in_dim, out_dim, num_workers, (cubic, cubic, layer3), cubic.workers == num_workers)


def _layer3_grid(out_dim: int, num_workers: int) -> tuple[int, int]:
    """The seed's layer-3 grid: the factor pair closest to ``out_dim / 512``."""
    return min(factor_pairs(num_workers), key=lambda p: abs(p[0] / p[1] - out_dim / CUBIC_TILE))


def _check_dims(in_dim: int, out_dim: int, num_workers: int) -> None:
    for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("workers", num_workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PrismInputError(f"{name}: must be a positive integer, got {value!r}")
    if num_workers > MAX_WORKERS:
        raise PrismInputError(f"workers: {num_workers} is more than this planner handles ({MAX_WORKERS})")


def _pow2_tile(grid: tuple[int, int], in_dim: int, out_dim: int) -> tuple[int, int]:
    """The covering tile, each side rounded up to a power of two (the seed's layer-3 tiles)."""
    tr, tc = covering_tile(grid, in_dim, out_dim)
    return next_pow2(tr), next_pow2(tc)


def _grid(pair: tuple[int, int]) -> str:
    return f"{pair[0]}x{pair[1]}"
