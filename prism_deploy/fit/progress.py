"""Progress bars for long fitting steps: tqdm on stderr, silent when stderr is not a terminal."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int | None, desc: str, unit: str = "row") -> Any:
    from tqdm import tqdm

    # disable=None: tqdm turns itself off when stderr is not a TTY (pipes, CI, tests).
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False, file=sys.stderr,
                disable=None, dynamic_ncols=True)
