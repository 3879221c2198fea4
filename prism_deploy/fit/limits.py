"""The range of every numeric option of ``fit``, ``workers`` and ``refit``, checked where it is parsed.

One table, used twice: by the command line (each option's argparse ``type``, so a bad value is
one ``error:`` line before anything is read) and by ``FitOptions`` (the same check for library
callers). A value outside its range used to surface late or not at all: ``--ridge nan``
computed NaN tiles and failed at the save, ``--gate-lr nan`` gave NaN gates whose round was
silently undone (exit 0), ``--seed -1`` overflowed in the held-out hash, ``--gate-scale 1e308``
gave NaN tiles or a solver traceback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prism_deploy.core.errors import PrismInputError
from prism_deploy.plan import MAX_WORKERS

FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class Limit:
    kind: type  # int or float
    low: float
    high: float
    low_open: bool = False  # True: the value must be > low
    why: str = ""

    def describe(self) -> str:
        lo = "(" if self.low_open else "["
        if self.kind is int:
            return f"an integer in {lo}{int(self.low)}, {int(self.high)}]"
        return f"a finite number in {lo}{_num(self.low)}, {_num(self.high)}]"


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
    "seed": Limit(int, 0, (1 << 63) - 1),
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
    limit = LIMITS[name]
    flag = "--" + name.replace("_", "-")
    v: int | float | None = None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        v = None
    elif limit.kind is float:
        try:
            v = float(value)
        except OverflowError:  # an integer beyond any float
            v = None
    elif isinstance(value, int):
        v = value
    elif value.is_integer():  # 3.0 is the integer 3; nan, inf and 2.5 are no integers
        v = int(value)
    if v is not None and (isinstance(v, int) or math.isfinite(v)):
        below = v <= limit.low if limit.low_open else v < limit.low
        if not below and v <= limit.high:
            return v
    raise PrismInputError(f"{flag}: {_shown(value)} is not {limit.describe()}")


def parse_number(name: str, text: str) -> int | float:
    """The command line's reading of ``text`` for option ``name``: parsed, then ``check_number``."""
    limit = LIMITS[name]
    flag = "--" + name.replace("_", "-")
    try:
        value: int | float = int(text, 10) if limit.kind is int else float(text)
    except (ValueError, OverflowError):
        raise PrismInputError(f"{flag}: {_shown(text)} is not {limit.describe()}") from None
    return check_number(name, value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _num(x: float) -> str:
    if float(x).is_integer() and abs(x) < 1e7:
        return str(int(x))
    return f"{x:g}"
