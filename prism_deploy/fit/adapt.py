"""One adaptation round's computation: candidates refitted on recorded pairs, and the gate.

``prism-deploy adapt`` (docs/adaptation.md) collects pairs from recorded request text, then:

- ranks the workers by their error on the recorded pairs (:func:`score_workers`, as ``workers``);
- makes two candidates by exact re-solves (:func:`refit_workers`, as ``refit``): the ``top``
  worst workers, and every worker (a full re-solve on the recorded data);
- scores the served adapter and each candidate on the recorded held-out pairs and on the
  original held-out set;
- :func:`decide`: a candidate may go live only when it is better on the recorded held-out pairs
  and, on the original held-out set, not worse than ``margin`` (relative) above the served
  adapter; of those, the one best on the recorded pairs.

Rank deficiency of the recorded pairs is refused (``strict`` solves, no ridge): too few or
repeated texts do not determine the workers' maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prism_deploy.fit.evaluate import evaluate
from prism_deploy.fit.localize import score_workers
from prism_deploy.fit.routed import assign_tiles, refit_workers
from prism_deploy.fit.stream import PairedData, Split
from prism_deploy.format import AdapterTensors
from prism_deploy.reference import PrismAdapter

WorkerId = tuple[int, int]


@dataclass
class Candidate:
    name: str  # "worst" or "all"
    workers: list[WorkerId]
    tensors: dict[str, Any]  # the stored tensors, the refitted tiles replaced
    recorded: float | None = None  # held-out relative error on the recorded pairs
    original: float | None = None  # held-out relative error on the original set
    passes: bool = False
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "workers": len(self.workers),
            "recorded_rel_err": self.recorded,
            "original_rel_err": self.original,
            "passes": self.passes,
            "why": self.why,
        }


@dataclass
class RoundResult:
    before_recorded: float | None
    before_original: float | None
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None
    ranked: list[dict[str, Any]] = field(default_factory=list)  # the worst workers, as `workers` shows them


def adapter_from(stored: AdapterTensors) -> PrismAdapter:
    return PrismAdapter(stored.config, {k: np.array(v, copy=True) for k, v in stored.tensors.items()})


def rel_err(adapter: PrismAdapter, data: PairedData, split: Split) -> float | None:
    return evaluate(adapter, data, split).rel_err


def refit_candidate(
    stored: AdapterTensors, fit_data: PairedData, name: str, workers: list[WorkerId], ridge: float
) -> Candidate:
    """``workers`` re-solved on every row of ``fit_data``; every other tensor byte keeps its value."""
    adapter = adapter_from(stored)
    new = refit_workers(adapter, fit_data, workers, ridge=ridge, strict=True, desc=f"refit {name}")
    assign_tiles(adapter, new)
    tensors = dict(stored.tensors)
    by_pipe: dict[int, list[int]] = {}
    for p, w in workers:
        by_pipe.setdefault(p, []).append(w)
    arrays = adapter.arrays()
    for p, ws in by_pipe.items():
        key = f"pipes.{p}.tiles"
        tiles = np.array(stored.tensors[key], copy=True)
        tiles[ws] = arrays.tiles(p)[ws]
        tensors[key] = tiles
    return Candidate(name, workers, tensors)


def decide(before_recorded: float, before_original: float, candidate: Candidate, margin: float) -> None:
    """Set ``candidate.passes`` and say why: better on the recorded held-out pairs, and on the
    original held-out set at most ``(1 + margin)`` times the served adapter's error."""
    rec, orig = candidate.recorded, candidate.original
    if rec is None or orig is None or not np.isfinite(rec) or not np.isfinite(orig):
        candidate.passes, candidate.why = False, "no finite error"
    elif rec >= before_recorded:
        candidate.passes, candidate.why = False, f"not better on the recorded text ({rec:.4g} >= {before_recorded:.4g})"
    elif orig > before_original * (1.0 + margin):
        candidate.passes, candidate.why = (
            False,
            (f"worse on the original set beyond the margin ({orig:.4g} > {before_original:.4g} x (1 + {margin:g}))"),
        )
    else:
        candidate.passes, candidate.why = True, "better on the recorded text, original within the margin"


def adapt_round(
    stored: AdapterTensors,
    fit_data: PairedData,
    score_data: PairedData,
    recorded_eval: PairedData,
    original: PairedData,
    *,
    top: int,
    margin: float,
    ridge: float = 0.0,
) -> RoundResult:
    """Score, refit the ``top`` worst workers and all workers, evaluate both, choose (or none)."""
    served = adapter_from(stored)
    result = RoundResult(rel_err(served, recorded_eval, "holdout"), rel_err(served, original, "holdout"))
    if result.before_recorded is None or result.before_original is None:
        raise ValueError("no held-out rows to compare on")
    scores = score_workers(served, score_data, ridge=ridge)
    result.ranked = [s.to_json() for s in scores[:top]]
    worst = [(s.pipe, s.worker) for s in scores[:top]]
    every = [(p, w) for p, spec in enumerate(stored.config.pipes) for w in range(spec.workers)]
    plans = [("worst", worst)] + ([("all", every)] if len(every) > len(worst) else [])
    for name, workers in plans:
        cand = refit_candidate(stored, fit_data, name, workers, ridge)
        adapter = PrismAdapter(stored.config, {k: np.asarray(v) for k, v in cand.tensors.items()})
        cand.recorded = rel_err(adapter, recorded_eval, "holdout")
        cand.original = rel_err(adapter, original, "holdout")
        decide(result.before_recorded, result.before_original, cand, margin)
        result.candidates.append(cand)
    passing = [c for c in result.candidates if c.passes]
    result.chosen = min(passing, key=lambda c: c.recorded or 0.0) if passing else None
    return result
