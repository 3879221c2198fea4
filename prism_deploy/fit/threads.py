"""How many threads a fit's torch operations use.

torch's default is one intra-op thread per core. On a machine whose cores are already busy
(the shared dev machines: load average 3 to 9 on 2 cores), every parallel operation then waits
at its barrier for a thread the scheduler has put aside: a gated fit of 8000 x 256 -> 160 took
38.6 s in gate training with 2 threads against 2.9 s with 1, next to three busy processes,
and burned 15 s of CPU spinning (docs/fitting.md, "Measurements"). Idle, the second thread
saved 10 to 44 % of the time. So the default ("auto") takes the cores that are not already busy,
judged by the 1-minute load average before the fit starts, at least one; ``--threads N`` sets
it. Only speed depends on it: results agree to rounding.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_threads(load: float | None = None, cores: int | None = None, default: int | None = None) -> tuple[int, str]:
    """``(threads, why)``: torch's default capped at the cores that the load average leaves free."""
    cores = usable_cores() if cores is None else cores
    default = torch.get_num_threads() if default is None else default
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return default, "torch's default (no load average on this system)"
    free = max(1, cores - int(load + 0.5))
    if free >= default:
        return default, f"torch's default: {default} (load average {load:.2f} on {cores} cores)"
    return free, f"{free} of {cores} cores: the others are busy (load average {load:.2f})"


def choose_threads(requested: int | None) -> tuple[int, str]:
    if requested is not None:
        return requested, "--threads"
    return auto_threads()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the caller's setting."""
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)
