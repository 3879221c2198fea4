"""The one home of comparisons (core/metrics.py), against numpy written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prism_deploy.core.metrics import ErrorAccumulator, compare, worst


def test_accumulated_figures_equal_the_whole_computed_at_once():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 5, 8))
    got = ref + 1e-3 * rng.standard_normal(ref.shape)
    acc = ErrorAccumulator()
    for i in range(3):
        acc.add(got[i], ref[i])
    d = (got - ref).ravel()
    assert acc.max_abs == pytest.approx(np.abs(d).max())
    assert acc.rel_l2 == pytest.approx(np.linalg.norm(d) / np.linalg.norm(ref))
    assert acc.cosine == pytest.approx(got.ravel() @ ref.ravel() / (np.linalg.norm(got) * np.linalg.norm(ref)))
    assert acc.tokens == 15


def test_an_overflow_is_never_an_error_of_zero():
    """parity showed "max abs error 0" when fp16 overflowed to inf in a later batch."""
    acc = ErrorAccumulator()
    acc.add(np.ones((2, 4)), np.ones((2, 4)))
    acc.add(np.array([[np.inf, 1, 1, 1]]), np.ones((1, 4)))
    assert math.isinf(acc.max_abs)
    acc.add(np.array([[np.nan, 1, 1, 1]]), np.ones((1, 4)))
    assert math.isnan(acc.max_abs)
    assert math.isnan(worst(0.0, math.nan)) and worst(1.0, 3.0, 2.0) == 3.0
    fig = compare(np.array([[[np.nan, 0.0]]]), np.array([[[1.0, 0.0]]]))
    assert math.isnan(fig["max_abs"])
