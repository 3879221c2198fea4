"""The range of every numeric option of ``fit``, ``workers`` and ``refit``, checked where it is parsed.

One table, used twice: by the command line (each option's argparse ``type``, so a bad value is
one ``error:`` line before anything is read) and by ``FitOptions`` (the same check for library
callers). A value outside its range used to surface late or not at all: ``--ridge nan``
computed NaN tiles and failed at the save, ``--gate-lr nan`` gave NaN gates whose round was
silently undone (exit 0), ``--seed -1`` overflowed in the held-out hash, ``--gate-scale 1e308``
gave NaN tiles or a solver traceback. The mechanism is ``prism_deploy.core.limits``.
"""

from __future__ import annotations

from prism_deploy.core import limits
from prism_deploy.core.limits import FLOAT16_MAX, SEED_MAX, Limit
from prism_deploy.plan import MAX_WORKERS

LIMITS: dict[str, Limit] = {
    # A ridge past 1e300 would overflow (X^T X)_ii + ridge in float64; any useful ridge is far below.
    "ridge": Limit(float, 0.0, 1e300),
    # A relative Adam step (the weights' own RMS times this); 1 replaces the weights every step.
    "gate_lr": Limit(float, 0.0, 1.0, low_open=True),
    # The gate weights reach gate_scale, and float16 engines carry them in float16 (lower/export.py).
    "gate_scale": Limit(float, 0.0, FLOAT16_MAX, low_open=True),
    "holdout": Limit(float, 0.0, 1.0),
    # Rounds and steps bound the work of a gated fit; far past any useful value, not a hang.
    "rounds": Limit(int, 0, 100),
    "gate_steps": Limit(int, 0, 1_000_000),
    "gate_batch": Limit(int, 1, 1 << 20),
    "sweeps": Limit(int, 1, 100),
    # The held-out hash takes the seed as an unsigned 64-bit integer, torch's generators too.
    "seed": Limit(int, 0, SEED_MAX),
    "chunk_rows": Limit(int, 1, 1 << 24),
    "workers": Limit(int, 1, MAX_WORKERS),
    "grid": Limit(int, 1, MAX_WORKERS),
    "top_k": Limit(int, 1, MAX_WORKERS),
    "threads": Limit(int, 1, 1024),
    "top": Limit(int, 0, MAX_WORKERS),
    "pipe": Limit(int, 0, 1 << 16),
}


def check_number(name: str, value: object) -> int | float:
    """``value`` if it is a number in ``LIMITS[name]``; otherwise ``PrismInputError`` naming the option."""
    return limits.check_number(flag(name), LIMITS[name], value)


def parse_number(name: str, text: str) -> int | float:
    return limits.parse_number(flag(name), LIMITS[name], text)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")
