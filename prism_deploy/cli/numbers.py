"""The argparse type of every numeric option: parsed and range-checked (``core.limits``), so a
bad value (``nan``, ``1e308``, ``-1``, 250 digits) is one ``error:`` line before any work."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.limits import SEED_MAX, Limit, parse_number

# ranges shared by several commands
SEED = Limit(int, 0, SEED_MAX)
COUNT = Limit(int, 1, 1 << 20)  # batches, rows, tokens, samples: past any use, short of an overflow
COUNT_OR_ZERO = Limit(int, 0, 1 << 20)
WIDTH = Limit(int, 1, 1 << 24)  # a model's hidden or embedding width
THREADS = Limit(int, 1, 1024)
PORT = Limit(int, 0, 65535)  # 0: a free port


def number_list(limit: Limit, flag: str = "") -> Callable[[str], tuple[int | float, ...]]:
    """An argparse ``type`` reading a comma list of numbers, each within ``limit``."""
    one = number(limit, flag)

    def parse(text: str) -> tuple[int | float, ...]:
        values = tuple(one(v.strip()) for v in text.split(",") if v.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: give at least one value")
        return values

    parse.__name__ = "number list"
    parse.limit = limit  # type: ignore[attr-defined]
    return parse


def number(limit: Limit, flag: str = "") -> Callable[[str], int | float]:
    """An argparse ``type`` reading a number within ``limit``."""

    def parse(text: str) -> int | float:
        try:
            return parse_number(flag or "value", limit, text)
        except PrismInputError as exc:
            # argparse prints "argument --x: <this>": say only what is wrong with the value
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None

    parse.__name__ = "number"
    parse.limit = limit  # type: ignore[attr-defined]  # read by the options' fuzz test
    return parse
