"""The gated form chosen per token bucket, by measurement on the build machine.

Which lowering of a gated pipe is fastest depends on the number of tokens of a call: the
sparse form (only the selected tiles) wins at one token, a dense form (A or B, every tile) at
many (docs/onnx-lowering.md has the figures). So an ONNX Runtime build of an adapter with gated
pipes exports every candidate form, times each on the build machine at each bucket of the
profile's token range, and keeps, per bucket, the fastest candidate whose output agrees with
the others' baseline; the manifest records the buckets, the timings and the choice
(``forms``), and the loader runs the chosen form's session for the request's token count.

The timer is injected (``FormTimer``): the choice is a pure function of the recorded timings
(``choose_form``), so it can be reproduced from a manifest and tested without timing anything.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

CANDIDATE_FORMS = ("A", "B", "sparse", "grouped")
# Bucket edges in tokens (batch * seq): a bucket holds the token counts above the previous edge
# up to its own. The last bucket reaches the profile's largest call and is timed at
# TIMED_TOKENS_MAX tokens at most (timing a 32768-token call of every form would make
# builds slow; past a few hundred tokens the dense forms' order no longer changes).
BUCKET_EDGES = (1, 8, 64, 512)
TIMED_TOKENS_MAX = 512
# Bumped when the choice's rules change: it enters the engines' cache key.
FORMS_RULES = 1

# (form, tokens, call) -> seconds per call
FormTimer = Callable[[str, int, Callable[[], Any]], float]


def token_buckets(profile: Any) -> list[tuple[int, int]]:
    """(max_tokens, timed_tokens) per bucket of ``profile``'s token range, rising."""
    lo = profile.batch[0] * profile.seq[0]
    hi = profile.batch[2] * profile.seq[2]
    top = min(hi, TIMED_TOKENS_MAX)
    buckets = [(e, e) for e in BUCKET_EDGES if lo <= e < top]
    return buckets + [(hi, top)]


def quartile_timer(
    form: str, tokens: int, call: Callable[[], Any], *, budget_s: float = 0.1, min_calls: int = 5, max_calls: int = 50
) -> float:
    """The lower quartile of a few timed calls after one untimed call (the default timer): on a
    shared machine a call another process interrupts is slower, never faster, so the lower
    quartile repeats where the median of a few calls does not."""
    del form, tokens
    call()
    times: list[float] = []
    spent = 0.0
    while len(times) < min_calls or (spent < budget_s and len(times) < max_calls):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    return statistics.quantiles(times, n=4)[0]


def choose_form(seconds: dict[str, float | None], passed: dict[str, bool], candidates: Sequence[str]) -> str | None:
    """The fastest candidate that passed (ties: the earlier candidate); None when none passed."""
    ok = [f for f in candidates if passed.get(f) and seconds.get(f) is not None]
    if not ok:
        return None
    return min(ok, key=lambda f: (seconds[f], candidates.index(f)))


def time_forms(
    runs: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    buckets: Sequence[tuple[int, int]],
    in_dim: int,
    baseline: str,
    rel_l2_max: float,
    timer: FormTimer | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per bucket: every candidate's seconds per call, whether it agrees with ``baseline``'s
    output within ``rel_l2_max`` (relative L2) on the same input, and the chosen form."""
    from prism_deploy.core.metrics import rel_l2

    timer = timer or quartile_timer
    rng = np.random.default_rng(seed)
    candidates = list(runs)
    records = []
    for max_tokens, tokens in buckets:
        x = rng.standard_normal((1, tokens, in_dim)).astype(np.float32)
        want = runs[baseline](x)
        seconds: dict[str, float | None] = {}
        passed: dict[str, bool] = {}
        for form, run in runs.items():
            got = run(x)
            passed[form] = bool(got.shape == want.shape and np.isfinite(got).all() and rel_l2(got, want) <= rel_l2_max)
            seconds[form] = float(timer(form, tokens, _bound(run, x))) if passed[form] else None
        chosen = choose_form(seconds, passed, candidates)
        records.append(
            {"max_tokens": max_tokens, "timed_tokens": tokens, "form": chosen, "seconds": seconds, "passed": passed}
        )
    return records


def _bound(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> Callable[[], Any]:
    return lambda: run(x)
