"""Numbers given by a user (an option, a library argument), checked against their range where
they are parsed: a bad value is one ``error:`` line before anything is read or computed.

A :class:`Limit` says what a number may be; :func:`check_number` checks a value (library
callers), :func:`parse_number` parses and checks the text of an option (the command line's
argparse types, ``prism_deploy.cli.numbers``). The tables of limits live with their users
(``prism_deploy.fit.option_ranges`` for fitting; the commands' own options beside them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from prism_deploy.core.errors import PrismInputError

# the largest finite float16 and float32: numbers a graph carries in those types are checked
# against them (a value finite in float64 can be infinite where it is used)
FLOAT16_MAX = 65504.0
FLOAT32_MAX = 3.4028234663852886e38
# seeds are taken as unsigned 64-bit integers by the hashes and generators that use them
SEED_MAX = (1 << 63) - 1


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


def check_number(flag: str, limit: Limit, value: object) -> int | float:
    """``value`` if it is a number within ``limit``; otherwise ``PrismInputError`` naming ``flag``."""
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


def parse_number(flag: str, limit: Limit, text: str) -> int | float:
    """The command line's reading of ``text`` for option ``flag``: parsed, then checked. Integers
    are decimal digits only, so ``1e3`` or ``0x10`` are not read as integers."""
    try:
        if len(text) > 400:  # no option needs more; Python would refuse over 4300 digits anyway
            raise ValueError(text)
        value: int | float = int(text, 10) if limit.kind is int else float(text)
    except (ValueError, OverflowError):
        raise PrismInputError(f"{flag}: {_shown(text)} is not {limit.describe()}") from None
    return check_number(flag, limit, value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _num(x: float) -> str:
    if float(x).is_integer() and abs(x) < 1e7:
        return str(int(x))
    return f"{x:g}"


def mask_problem(mask: Any) -> str | None:
    """What is wrong with an ``attention_mask``'s values, or None: only 0 (padding) and 1 (a token)
    mean something; the graphs would read any other number as a weight and change the logits."""
    import numpy as np

    values = np.asarray(mask)
    if values.size == 0:
        return None
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        return f"attention_mask: values must be 0 (padding) or 1 (a token), got {bad.reshape(-1)[0]!r}"
    return None
