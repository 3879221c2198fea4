"""``fit_adapter``: from paired activations to a v1 adapter.

Ungated pipes: the closed form (normal.py), one pass over the data and one Cholesky.
Several ungated pipes add up to one linear map ``sum_p beta_p W_p``; any split of the
full-matrix solution ``W`` fits equally well, and the split with the least weight norm
(the limit of equal ridge on every pipe) is ``W_p = beta_p W / sum_q beta_q^2`` (``W / P``
for ``combine = sum``), so that is what ``joint`` stores.

Gated pipes: workers fitted with the routing fixed (routed.py), gates trained with the
workers frozen (gates.py), alternated while the held-out error falls. With several pipes
the pipes are fitted by backfitting: each pipe in turn is re-solved exactly against what
the others leave, a few sweeps. A joint solve over all pipes at once would need a gram
matrix over every pipe's features (``P*in_dim`` squared per output segment) and the pipes'
row-blocks need not line up; each backfitting step is an exact block minimiser of the same
convex objective, so the error never rises and converges to the joint optimum.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.tiles import tiles_from_dense
from prism_deploy.fit import budget
from prism_deploy.fit.evaluate import Metrics, evaluate
from prism_deploy.fit.gates import init_gates, train_gates
from prism_deploy.fit.normal import NormalEquations, accumulate_normal, solve_joint, solve_per_tile
from prism_deploy.fit.option_ranges import check_number
from prism_deploy.fit.progress import overall_progress
from prism_deploy.fit.routed import assign_tiles, refit_work, refit_workers
from prism_deploy.fit.solve import SolveInfo
from prism_deploy.fit.stream import PairedData
from prism_deploy.fit.threads import choose_threads, torch_threads
from prism_deploy.format import AdapterConfig
from prism_deploy.reference import PrismAdapter

Method = Literal["joint", "per-tile"]


@dataclass
class FitOptions:
    method: Method = "joint"
    ridge: float = 0.0
    rounds: int = 3  # gate-training / worker-refit rounds (gated pipes only)
    gate_steps: int = 300
    gate_lr: float = 1e-2
    gate_batch: int = 256
    sweeps: int = 3  # backfitting sweeps over the pipes (several pipes, some gated)
    seed: int = 0
    dtype: torch.dtype = torch.float32
    threads: int | None = None  # intra-op threads; None: auto (fit/threads.py)

    def __post_init__(self) -> None:
        # The numeric options' one range check (fit/option_ranges.py), for library callers too.
        for name in ("ridge", "rounds", "gate_steps", "gate_lr", "gate_batch", "sweeps", "seed"):
            setattr(self, name, check_number(name, getattr(self, name)))
        if self.threads is not None:
            self.threads = int(check_number("threads", self.threads))
        if self.dtype not in (torch.float32, torch.float16):
            raise PrismInputError(f"--dtype: {self.dtype} is not float32 or float16")


@dataclass
class FitReport:
    config: AdapterConfig
    method: str
    ridge: float
    train: Metrics
    holdout: Metrics
    solve: SolveInfo | None = None
    full_ls_holdout: Metrics | None = None  # the unconstrained full-matrix LS map, for comparison
    rounds: list[dict[str, Any]] = field(default_factory=list)
    estimate: budget.FitEstimate | None = None
    threads: int | None = None
    threads_why: str = ""

    def to_json(self) -> dict[str, Any]:
        pipes = []
        for i, spec in enumerate(self.config.pipes):
            r, e = self.holdout.worst_row_block(spec) if self.holdout.rows else self.train.worst_row_block(spec)
            pipes.append(
                {
                    "index": i,
                    "name": spec.name,
                    "grid": list(spec.grid),
                    "tile": list(spec.tile),
                    "top_k": spec.top_k,
                    "gate_scale": spec.gate_scale if spec.gated else None,
                    "worst_row_block": r,
                    "worst_row_block_rel_err": e,
                }
            )
        return {
            "method": self.method,
            "ridge": self.ridge,
            "train": self.train.to_json(),
            "holdout": self.holdout.to_json(),
            "full_ls_holdout": None if self.full_ls_holdout is None else self.full_ls_holdout.to_json(),
            "solve": None if self.solve is None else self.solve.to_json(),
            "pipes": pipes,
            "rounds": self.rounds,
            "threads": self.threads,
            "threads_why": self.threads_why,
            "estimate": None
            if self.estimate is None
            else {
                "adapter_bytes": self.estimate.adapter_bytes,
                "peak_bytes": self.estimate.peak_bytes,
                "peak_step": self.estimate.peak_step,
                "chunk_rows": self.estimate.chunk_rows,
            },
        }


def fit_adapter(
    config: AdapterConfig, data: PairedData, opts: FitOptions | None = None
) -> tuple[PrismAdapter, FitReport]:
    """Fit every tile (and gate) of ``config`` to ``data``; returns the adapter in ``opts.dtype``.

    Before the first pass: the options and layout are checked, the memory the fit needs is
    estimated and refused when it exceeds what is available (fit/budget.py), and the chunks
    are cut so that one step's working set is bounded. Progress goes to stderr when it is a
    terminal: one bar per step and one for the whole fit, with the time left.
    """
    opts = opts or FitOptions()
    _check(config, data, opts)
    est = fit_estimate(config, data, opts)
    budget.check_budget(est, "this fit")
    data = data.with_chunk_rows(est.chunk_rows)
    threads, why = choose_threads(opts.threads)
    with torch_threads(threads), overall_progress(fit_work(config, data, opts), "fit"):
        adapter, report = _fit(config, data, opts)
    report.estimate, report.threads, report.threads_why = est, threads, why
    return adapter, report


def fit_estimate(config: AdapterConfig, data: PairedData, opts: FitOptions) -> budget.FitEstimate:
    return budget.estimate_fit(
        config,
        rows_train=data.count("train"),
        rows_holdout=data.count("holdout"),
        chunk_rows=data.chunk_rows,
        itemsize=torch.finfo(opts.dtype).bits // 8,
        gate_batch=opts.gate_batch,
        method=opts.method,
    )


def fit_work(config: AdapterConfig, data: PairedData, opts: FitOptions) -> float:
    """The work of every step ``_fit`` will run, in multiply-adds (fit/budget.py), assuming every
    gate round runs; the steps report theirs to the overall bar with the same formulas."""
    n_train, n_held = data.count("train"), data.count("holdout")
    chunk = data.chunk_rows
    d, m = config.in_dim, config.out_dim
    work = n_train * budget.pass_work(budget.normal_macs(config), chunk)
    if opts.method == "per-tile":
        work += sum(s.cols * budget.solve_macs(s.tile_cols, m) for s in config.pipes)
    else:
        work += budget.solve_macs(d, m)
    evaluate_row = budget.pass_work(budget.forward_macs(config), chunk)
    if config.gated_pipes:
        split_rows = n_held if n_held else n_train
        sweeps = 1 if config.num_pipes == 1 else opts.sweeps
        backfit_work = 0.0
        for p, spec in enumerate(config.pipes):
            per_row, solves = refit_work(config, [(p, w) for w in range(spec.workers)], chunk)
            backfit_work += sweeps * (n_train * per_row + solves)
        work += backfit_work + split_rows * evaluate_row
        work += opts.rounds * (
            opts.gate_steps * budget.gate_step_macs(config, opts.gate_batch)
            + backfit_work
            + 2 * split_rows * evaluate_row
        )
    work += (n_train + n_held) * evaluate_row
    if config.gated_pipes or opts.method != "joint":
        work += n_held * budget.pass_work(d * m, chunk)
        if opts.method != "joint":
            work += budget.solve_macs(d, m)
    return work


def _fit(config: AdapterConfig, data: PairedData, opts: FitOptions) -> tuple[PrismAdapter, FitReport]:
    ne = accumulate_normal(data, "train")
    gated = bool(config.gated_pipes)
    if opts.method == "per-tile":
        mats = [solve_per_tile(ne, spec, opts.ridge, strict=True) for spec in config.pipes]
        info = None
    else:
        w, info = solve_joint(ne, opts.ridge, strict=True)
        betas = [1.0] * config.num_pipes  # fit writes combine = "sum"
        norm = sum(b * b for b in betas)
        mats = [w * (b / norm) for b in betas]
    work = _adapter_from_dense(config, mats)
    del mats
    rounds: list[dict[str, Any]] = []
    if gated:
        init_gates(work, _x_rms(ne), opts.seed)
        rounds = _fit_gated(work, data, opts)
    adapter = _cast(work, opts.dtype)
    del work
    train = evaluate(adapter, data, "train", desc="evaluate train")
    holdout = evaluate(adapter, data, "holdout", desc="evaluate held-out")
    full_ls = None
    if gated or opts.method != "joint":
        w_full, _ = solve_joint(ne, opts.ridge, strict=False) if opts.method != "joint" else (w, None)
        full_ls = evaluate(_dense_adapter(config, w_full), data, "holdout", desc="evaluate full LS")
    return adapter, FitReport(config, opts.method, opts.ridge, train, holdout, info, full_ls, rounds)


def backfit(adapter: PrismAdapter, data: PairedData, *, ridge: float, sweeps: int) -> None:
    """Re-solve each pipe's workers exactly against the others' residual, ``sweeps`` times.

    With one pipe one sweep is already the exact optimum for the current routing.
    """
    n = adapter.config.num_pipes
    for sweep in range(1 if n == 1 else sweeps):
        for p, spec in enumerate(adapter.config.pipes):
            new = refit_workers(
                adapter,
                data,
                [(p, w) for w in range(spec.workers)],
                ridge=ridge,
                desc=f"re-solve pipe {p}" + (f" (sweep {sweep + 1})" if n > 1 else ""),
            )
            assign_tiles(adapter, new)


def _fit_gated(work: PrismAdapter, data: PairedData, opts: FitOptions) -> list[dict[str, Any]]:
    """Round 0: workers for the initial routing. Then gates, workers; keep the best held-out."""
    split = "holdout" if data.count("holdout") else "train"
    backfit(work, data, ridge=opts.ridge, sweeps=opts.sweeps)
    best = _score(work, data, split)
    rounds = [{"round": 0, "step": "workers for the initial routing", f"{split}_rel_err": best}]
    for k in range(1, opts.rounds + 1):
        saved = copy.deepcopy(work.state_dict())
        losses = train_gates(
            work,
            data,
            steps=opts.gate_steps,
            lr=opts.gate_lr,
            batch_rows=opts.gate_batch,
            seed=opts.seed + k,
            desc=f"round {k}: gates",
        )
        after_gates = _score(work, data, split)
        backfit(work, data, ridge=opts.ridge, sweeps=opts.sweeps)
        err = _score(work, data, split)
        rounds.append(
            {
                "round": k,
                "gate_loss_first": losses[0] if losses else None,
                "gate_loss_last": losses[-1] if losses else None,
                f"{split}_rel_err_after_gates": after_gates,
                f"{split}_rel_err": err,
            }
        )
        if not err < best:
            work.load_state_dict(saved)  # this round did not help: keep the previous state and stop
            rounds[-1]["kept"] = False
            break
        rounds[-1]["kept"] = True
        best = err
    return rounds


def _score(adapter: PrismAdapter, data: PairedData, split: str) -> float:
    m = evaluate(adapter, data, split, desc=f"evaluate {split}")  # type: ignore[arg-type]
    return float("inf") if m.rel_err is None else m.rel_err


def _check(config: AdapterConfig, data: PairedData, opts: FitOptions) -> None:
    if (config.in_dim, config.out_dim) != (data.in_dim, data.out_dim):
        raise PrismInputError(
            f"layout is {config.in_dim} -> {config.out_dim} but --x has {data.in_dim} columns and --z {data.out_dim}"
        )
    if opts.method not in ("joint", "per-tile"):
        raise PrismInputError(f"--method: {opts.method!r} is not joint or per-tile")
    if opts.method == "per-tile" and config.gated_pipes:
        raise PrismInputError("--method per-tile is the seed's recipe for ungated pipes; drop --top-k or use joint")
    n_train = data.count("train")
    if n_train == 0:
        raise PrismInputError(f"no training rows: --holdout {data.holdout} holds out all {data.rows} rows")
    if opts.ridge == 0 and n_train < data.in_dim:
        raise PrismInputError(
            f"X^T X of the {n_train} training rows is rank-deficient: fewer rows than in_dim={data.in_dim}; "
            "add --ridge (e.g. --ridge 1e-3) or more rows"
        )


def _x_rms(ne: NormalEquations) -> float:
    return float(torch.diagonal(ne.xtx).sum() / max(ne.rows * ne.xtx.shape[0], 1)) ** 0.5


def _adapter_from_dense(config: AdapterConfig, mats: list[torch.Tensor]) -> PrismAdapter:
    """A float64 working adapter: pipe ``p`` holds ``mats[p]`` cut into tiles, gates zero."""
    tensors: dict[str, torch.Tensor] = {}
    for i, (spec, w) in enumerate(zip(config.pipes, mats)):
        tensors[f"pipes.{i}.tiles"] = tiles_from_dense(w, spec.grid, spec.tile)
        if spec.gated:
            tensors[f"pipes.{i}.gate.weight"] = torch.zeros(spec.workers, config.in_dim, dtype=torch.float64)
            tensors[f"pipes.{i}.gate.bias"] = torch.zeros(spec.workers, dtype=torch.float64)
    return PrismAdapter(config, tensors)


def _dense_adapter(config: AdapterConfig, w: torch.Tensor) -> PrismAdapter:
    from prism_deploy.format import PipeSpec

    spec = PipeSpec("full", (1, 1), (config.out_dim, config.in_dim))
    return PrismAdapter(AdapterConfig(config.in_dim, config.out_dim, (spec,)), {"pipes.0.tiles": w[None].clone()})


def _cast(adapter: PrismAdapter, dtype: torch.dtype) -> PrismAdapter:
    return PrismAdapter(adapter.config, {k: v.to(dtype).contiguous() for k, v in adapter.tensors().items()})
