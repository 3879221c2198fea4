"""Exact least squares for any set of workers, with every other tensor and the routing fixed.

With the gates held fixed the adapter's output is linear in the tiles: output row ``o`` of
the combined output is ``sum_p beta_p sum_c g_{p,r_p(o),c}(x) * (x_c . tiles_p[r_p(o), c][o - r*tr])``.
So re-solving a set ``S`` of workers against the residual ``e = z - y(all tiles outside S,
S zeroed)`` is a linear least-squares problem. Output rows covered by the same workers of
``S`` share their features, so the rows are cut into *segments* (the common refinement of
the selected workers' row ranges); per segment the features are ``[beta_p * g_w(x) * x_cols(w)]``
over the selected workers covering it, and its normal equations are accumulated in chunks.
Segments with the same features share one gram matrix and are one multi-RHS solve. For an
ungated pipe the features of worker ``r*C + c`` do not depend on ``r``, so refitting a
whole ungated pipe needs one gram (``X^T X``) for all its row-blocks.

Used for: refitting a gated pipe's workers given its routing, backfitting several pipes,
and ``prism-deploy refit`` (a few workers, the rest byte-identical).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from prism_deploy.core.tiles import worker_block
from prism_deploy.fit import budget
from prism_deploy.fit.progress import add_work, progress_bar
from prism_deploy.fit.solve import solve_normal
from prism_deploy.fit.stream import PairedData, Split
from prism_deploy.format import AdapterConfig
from prism_deploy.reference import PrismAdapter

WorkerId = tuple[int, int]  # (pipe index, worker index)


@dataclass
class _Member:
    pipe: int
    worker: int
    rows: slice
    cols: slice
    key: tuple[int, int, int]  # what its features depend on: (pipe, column block, worker or -1)


@dataclass
class _Segment:
    rows: slice
    members: list[_Member]
    key: tuple[tuple[int, int, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        self.key = tuple(m.key for m in self.members)


def refit_workers(
    adapter: PrismAdapter,
    data: PairedData,
    selection: Iterable[WorkerId],
    *,
    ridge: float = 0.0,
    split: Split = "train",
    strict: bool = False,
    desc: str = "refit",
) -> dict[WorkerId, torch.Tensor]:
    """New float64 tiles ``[tr, tc]`` for the selected workers (padding zero); nothing is changed in place."""
    cfg = adapter.config
    pipes = adapter.pipe_list()
    selected = sorted(set(selection))
    for p, w in selected:
        if not (0 <= p < cfg.num_pipes and 0 <= w < cfg.pipes[p].workers):
            raise ValueError(f"no worker {w} in pipe {p}")
    result = {(p, w): torch.zeros(cfg.pipes[p].tile, dtype=torch.float64) for p, w in selected}
    plan = _plan(cfg, selected)
    if not plan.segments:
        return result
    segments, fixed_pipes, gated_pipes = plan.segments, plan.fixed_pipes, plan.gated_pipes
    fixed = _without(adapter, selected)
    betas = adapter.betas(torch.float64)

    grams: dict[tuple, torch.Tensor] = {}
    rhs = [torch.zeros(0)] * len(segments)
    for i, seg in enumerate(segments):
        dim = plan.dims[seg.key]
        grams.setdefault(seg.key, torch.zeros(dim, dim, dtype=torch.float64))
        rhs[i] = torch.zeros(dim, seg.rows.stop - seg.rows.start, dtype=torch.float64)
    per_row, _ = plan.work()

    with progress_bar(data.count(split), desc, work=budget.pass_work(per_row, data.chunk_rows)) as bar, torch.no_grad():
        for x, z in data.chunks(split):
            e = z.clone()
            for p in fixed_pipes:
                e -= betas[p] * fixed.pipe_list()[p](x)
            gates = {p: pipes[p].routing(x).dense for p in gated_pipes}  # type: ignore[union-attr]
            features: dict[tuple, torch.Tensor] = {}
            for i, seg in enumerate(segments):
                f = features.get(seg.key)
                if f is None:
                    f = torch.cat([_feature(m, x, gates, betas) for m in seg.members], dim=1)
                    features[seg.key] = f
                    grams[seg.key].addmm_(f.T, f)
                rhs[i].addmm_(f.T, e[:, seg.rows])
            bar.update(x.shape[0])

    for key, gram in grams.items():
        idx = [i for i, s in enumerate(segments) if s.key == key]
        sol, _ = solve_normal(
            gram,
            torch.cat([rhs[i] for i in idx], dim=1),
            ridge,
            what="the selected workers' normal equations",
            strict=strict,
        )
        add_work(budget.solve_macs(gram.shape[0], sol.shape[1]))  # as _Plan.work counts it
        offset = 0
        for i in idx:
            seg = segments[i]
            width = seg.rows.stop - seg.rows.start
            part = sol[:, offset : offset + width]
            offset += width
            f0 = 0
            for m in seg.members:
                spec = cfg.pipes[m.pipe]
                r, c = divmod(m.worker, spec.cols)
                n = m.cols.stop - m.cols.start
                tile = result[(m.pipe, m.worker)]
                tile[
                    seg.rows.start - r * spec.tile_rows : seg.rows.stop - r * spec.tile_rows,
                    m.cols.start - c * spec.tile_cols : m.cols.stop - c * spec.tile_cols,
                ] = part[f0 : f0 + n].T
                f0 += n
    return result


def refit_work(config: AdapterConfig, selection: Iterable[WorkerId], chunk_rows: int) -> tuple[float, float]:
    """``(per_row, solves)``: the work ``refit_workers`` reports for this selection, in
    multiply-adds (fit/budget.py), for the overall progress estimate of a command."""
    per_row, solves = _plan(config, sorted(set(selection))).work()
    return budget.pass_work(per_row, chunk_rows) if per_row else 0.0, solves


@dataclass
class _Plan:
    """What a refit of a selection solves: its members, segments and gram sizes."""

    config: AdapterConfig
    segments: list[_Segment]
    fixed_pipes: list[int]  # pipes whose forward gives the fixed part of the output
    gated_pipes: list[int]  # pipes whose routing the features need
    dims: dict[tuple, int]  # gram size per feature key

    def work(self) -> tuple[int, int]:
        """Per row: the fixed pipes' forward, the routing, every gram and right-hand side;
        and the solves (one per key, right-hand sides: its segments' rows)."""
        if not self.segments:
            return 0, 0
        cfg = self.config
        widths: dict[tuple, int] = {}
        for seg in self.segments:
            widths[seg.key] = widths.get(seg.key, 0) + seg.rows.stop - seg.rows.start
        per_row = (
            budget.forward_macs(cfg, self.fixed_pipes)
            + sum(cfg.in_dim * cfg.pipes[p].workers for p in self.gated_pipes)
            + sum(d * d + d * widths[k] for k, d in self.dims.items())
        )
        return per_row, sum(budget.solve_macs(d, widths[k]) for k, d in self.dims.items())


def _plan(cfg: AdapterConfig, selected: list[WorkerId]) -> _Plan:
    members = []
    for p, w in selected:
        spec = cfg.pipes[p]
        rows, cols = worker_block(spec.grid, spec.tile, w, cfg.in_dim, cfg.out_dim)
        if rows.start == rows.stop or cols.start == cols.stop:
            continue  # wholly in the padding: it multiplies zeros or writes discarded rows
        key = (p, w % spec.cols, w if spec.gated else -1)
        members.append(_Member(p, w, rows, cols, key))
    segments = _segments(members)
    # Pipes whose every worker is being re-solved contribute nothing to the fixed part: skip
    # their (all-zero) forward, which would cost as much as the accumulation itself.
    counts = {p: 0 for p in range(cfg.num_pipes)}
    for p, _ in selected:
        counts[p] += 1
    fixed_pipes = [p for p in range(cfg.num_pipes) if counts[p] < cfg.pipes[p].workers]
    gated_pipes = sorted({m.pipe for m in members if cfg.pipes[m.pipe].gated})
    dims = {seg.key: sum(m.cols.stop - m.cols.start for m in seg.members) for seg in segments}
    return _Plan(cfg, segments, fixed_pipes, gated_pipes, dims)


def assign_tiles(adapter: PrismAdapter, new: dict[WorkerId, torch.Tensor]) -> None:
    """Write new tiles into ``adapter`` in place, cast to each pipe's stored dtype."""
    pipes = adapter.pipe_list()
    with torch.no_grad():
        for (p, w), tile in new.items():
            pipes[p].tiles[w] = tile.to(pipes[p].tiles.dtype)


def _segments(members: list[_Member]) -> list[_Segment]:
    cuts = sorted({m.rows.start for m in members} | {m.rows.stop for m in members})
    segments = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        covering = [m for m in members if m.rows.start <= a < m.rows.stop]
        if covering:
            segments.append(_Segment(slice(a, b), covering))
    return segments


def _feature(m: _Member, x: torch.Tensor, gates: dict[int, torch.Tensor], betas: torch.Tensor) -> torch.Tensor:
    f = x[:, m.cols] * betas[m.pipe]
    if m.pipe in gates:
        f = f * gates[m.pipe][:, m.worker : m.worker + 1]
    return f


def _without(adapter: PrismAdapter, selected: list[WorkerId]) -> PrismAdapter:
    """A float64 copy of ``adapter`` with the selected tiles zeroed (the fixed part of the output)."""
    tensors = {k: v.to(torch.float64).clone() for k, v in adapter.tensors().items()}
    for p, w in selected:
        tensors[f"pipes.{p}.tiles"][w] = 0
    return PrismAdapter(adapter.config, tensors)
