"""Progress of long fitting steps: tqdm on stderr, silent when stderr is not a terminal.

Each pass over the data or run of gate steps has its own bar (its total known up front, so
tqdm shows its rate and time left). A whole command (``fit``, ``workers``, ``refit``) also
opens an overall bar, ``overall_progress(total_work)``, whose total is the work of every step
it will run, estimated before the first (fit/budget.py: multiply-adds per row or per step).
Each step bar passes its updates, weighted by its work per unit, on to the overall bar, so the
overall bar's time left covers the steps still to come, not only the current one. A gated fit
whose rounds stop early (a round that does not help) finishes before its estimate.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_OVERALL: ContextVar[Any] = ContextVar("prism_fit_overall_bar", default=None)


def _tqdm(**kw: Any) -> Any:
    from tqdm import tqdm

    # disable=None: tqdm turns itself off when stderr is not a TTY (pipes, CI, tests).
    return tqdm(leave=False, file=sys.stderr, disable=None, dynamic_ncols=True, **kw)


class _StepBar:
    """A step's bar that also moves the overall bar by ``work`` per unit."""

    def __init__(self, bar: Any, work: float, overall: Any) -> None:
        self.bar, self.work, self.overall = bar, work, overall

    def update(self, n: float = 1) -> None:
        self.bar.update(n)
        if self.overall is not None and self.work:
            self.overall.update(n * self.work)

    def __enter__(self) -> _StepBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def progress_bar(total: int | None, desc: str, unit: str = "row", work: float = 0.0) -> _StepBar:
    """A step of ``total`` units (rows, gate steps); ``work``: its cost per unit for the overall bar."""
    overall = _OVERALL.get()
    bar = _tqdm(total=total, desc=desc, unit=unit, unit_scale=True, position=0 if overall is None else 1)
    return _StepBar(bar, work, overall)


@contextmanager
def overall_progress(total_work: float, desc: str) -> Iterator[Any]:
    """The whole command's bar: percent of the estimated work done, elapsed and time left."""
    # smoothing=0: the rate is the average since the start, the honest one for steps of mixed kinds.
    bar = _tqdm(
        total=max(total_work, 1.0),
        desc=desc,
        position=0,
        smoothing=0,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, about {remaining} left",
    )
    token = _OVERALL.set(bar)
    try:
        yield bar
    finally:
        _OVERALL.reset(token)
        bar.close()


def add_work(work: float) -> None:
    """Count ``work`` done by a step without a bar of its own (a solve) toward the overall bar."""
    overall = _OVERALL.get()
    if overall is not None and work:
        overall.update(work)
