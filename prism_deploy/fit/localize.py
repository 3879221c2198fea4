"""Localized error: which workers are responsible for the held-out error.

Two numbers per worker, both as a fraction of the adapter's held-out squared error
``||E||^2 = sum ||z - y||^2`` over the held-out rows:

- **deviation** (the ranking key): how far the worker's tile is from its share of the joint
  solution, in output units. The share ``T*_w`` is the worker's tile when its whole pipe is
  re-solved exactly on the training rows, every other pipe and the routing fixed (the joint
  least-squares solution of that pipe; unique when the data have full rank). With
  ``D_w = T_w - T*_w`` and ``f = beta_p * g_w(x) * x_c`` the worker's features,

      deviation_w = sum over held-out rows ||f D_w^T||^2 / ||E||^2 = tr(D_w A_w D_w^T) / ||E||^2.

  In an adapter fitted to this data every deviation is ~0 (rounding to the stored dtype);
  a corrupted, stale or badly refitted tile stands out by orders of magnitude, because the
  joint solution of its pipe does not depend on its current value.
- **excess**: the held-out squared error that re-solving the worker alone (everything else
  fixed) would remove, ``tr(B_w^T A_w^+ B_w) / ||E||^2`` with ``A_w = sum f^T f`` and
  ``B_w = sum f^T e`` over the held-out rows. It says how much a single-worker ``refit`` could
  gain, but it does not single out the culprit: when input slices are correlated, a
  neighbour sharing the culprit's output rows can undo most of the same damage.

One pass over the training rows per pipe (the joint re-solve) and one over the held-out rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_deploy.core.tiles import worker_block
from prism_deploy.fit import budget
from prism_deploy.fit.progress import progress_bar
from prism_deploy.fit.routed import WorkerId, refit_work, refit_workers
from prism_deploy.fit.solve import solve_normal
from prism_deploy.fit.stream import PairedData, Split
from prism_deploy.format import AdapterConfig
from prism_deploy.reference import PrismAdapter


@dataclass
class WorkerScore:
    pipe: int
    worker: int
    row_block: int
    col_block: int
    deviation: float  # held-out squared output of (tile - its joint share) / held-out squared error
    excess: float  # held-out squared error re-solving it alone would remove / held-out squared error
    row_block_rel_err: float | None  # held-out relative error of the combined output on its rows

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def score_work(config: AdapterConfig, data: PairedData) -> float:
    """The work of ``score_workers`` in multiply-adds (fit/budget.py): each pipe's joint re-solve
    on the training rows, then the scoring pass over the held-out rows."""
    n_train, n_held = data.count("train"), data.count("holdout")
    work = 0.0
    for p, spec in enumerate(config.pipes):
        per_row, solves = refit_work(config, [(p, w) for w in range(spec.workers)], data.chunk_rows)
        work += n_train * per_row + solves
    return work + n_held * budget.pass_work(_scoring_macs(config), data.chunk_rows)


def _scoring_macs(config: AdapterConfig) -> int:
    """Per held-out row: the forward, then per pipe the per-worker grams and cross terms."""
    total = budget.forward_macs(config)
    for s in config.pipes:
        total += (s.rows if s.gated else 1) * s.cols * s.tile_cols**2 + s.rows * s.cols * s.tile_cols * s.tile_rows
    return total


def score_workers(adapter: PrismAdapter, data: PairedData, *, ridge: float = 0.0) -> list[WorkerScore]:
    """Every real worker's deviation and excess on the held-out rows, worst deviation first."""
    cfg = adapter.config
    shares: dict[WorkerId, torch.Tensor] = {}
    for p, spec in enumerate(cfg.pipes):
        shares.update(
            refit_workers(
                adapter,
                data,
                [(p, w) for w in range(spec.workers)],
                ridge=ridge,
                split="train",
                desc=f"joint share of pipe {p}",
            )
        )
    split: Split = "holdout"
    pipes = adapter.pipe_list()
    betas = adapter.betas(torch.float64)
    grams, cross = [], []
    for spec in cfg.pipes:
        (R, C), (tr, tc) = spec.grid, spec.tile
        grams.append(torch.zeros((R if spec.gated else 1), C, tc, tc, dtype=torch.float64))
        cross.append(torch.zeros(R, C, tc, tr, dtype=torch.float64))
    sq_err = torch.zeros(cfg.out_dim, dtype=torch.float64)
    sq_z = torch.zeros(cfg.out_dim, dtype=torch.float64)
    rows = 0
    per_row = budget.pass_work(_scoring_macs(cfg), data.chunk_rows)
    with progress_bar(data.count(split), f"score workers ({split})", work=per_row) as bar, torch.no_grad():
        for x, z in data.chunks(split):
            e = z - adapter(x)
            sq_err += (e**2).sum(0)
            sq_z += (z**2).sum(0)
            rows += x.shape[0]
            for p, (spec, pipe) in enumerate(zip(cfg.pipes, pipes)):
                (R, C), (tr, tc) = spec.grid, spec.tile
                xp = pipe.padded_input(x).reshape(-1, C, tc) * betas[p]
                ep = torch.nn.functional.pad(e, (0, spec.padded_out - cfg.out_dim)).reshape(-1, R, tr)
                if spec.gated:
                    g = pipe.routing(x).dense.reshape(-1, R, C)  # type: ignore[union-attr]
                    grams[p] += torch.einsum("nrc,nci,ncj->rcij", g * g, xp, xp)
                    cross[p] += torch.einsum("nrc,nci,nrj->rcij", g, xp, ep)
                else:
                    grams[p][0] += torch.einsum("nci,ncj->cij", xp, xp)
                    cross[p] += torch.einsum("nci,nrj->rcij", xp, ep)
            bar.update(x.shape[0])
    total = float(sq_err.sum())
    scores = []
    for p, spec in enumerate(cfg.pipes):
        for w in range(spec.workers):
            r, c = divmod(w, spec.cols)
            out_rows, cols = worker_block(spec.grid, spec.tile, w, cfg.in_dim, cfg.out_dim)
            if out_rows.start == out_rows.stop or cols.start == cols.stop or rows == 0:
                continue
            a = grams[p][r if spec.gated else 0, c]
            b = cross[p][r, c]
            sol, _ = solve_normal(a, b)
            gain = float((b * sol).sum())
            d = pipes[p].tiles.detach()[w].to(torch.float64) - shares[(p, w)]
            d = d[: out_rows.stop - out_rows.start]  # rows past out_dim are discarded anyway
            dev = float(torch.einsum("ri,ij,rj->", d, a, d))
            den = float(sq_z[out_rows].sum())
            rb = (float(sq_err[out_rows].sum()) / den) ** 0.5 if den > 0 else None
            scale = 1.0 / total if total > 0 else 0.0
            scores.append(WorkerScore(p, w, r, c, dev * scale, gain * scale, rb))
    scores.sort(key=lambda s: (-s.deviation, -s.excess))
    return scores
