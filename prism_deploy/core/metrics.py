"""Metrics: the one home of every comparison of an output with its reference (numpy, float64).

- ``compare(got, ref, mask)``: per-token figures over the real tokens: ``max_abs``, ``rel_l2``
  (``||got - ref|| / ||ref||`` over every value), ``min_cosine`` (the smallest per-token cosine),
  and for logits ``top1`` (agreement of the argmax over tokens whose reference top-1 / top-2 gap
  is clear), ``top1_all`` and ``ambiguous``; ``kl_divergence`` adds next-token KL.
- ``ErrorAccumulator``: ``max_abs``, ``rel_l2`` and ``cosine`` (of the flattened outputs)
  accumulated over batches, for checks that stream many inputs (adapter parity).
- ``max_abs_relative``: the largest absolute error over the largest reference magnitude, a
  scale-free figure for benchmarks (not a relative L2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def rel_l2(got: Any, ref: Any) -> float:
    """``||got - ref|| / ||ref||`` over every value (``||got||`` when the reference is zero)."""
    g, r = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    den = float(np.linalg.norm(r))
    num = float(np.linalg.norm(g - r))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def max_abs_relative(got: Any, ref: Any) -> dict[str, float]:
    g = np.asarray(got, np.float64).reshape(np.shape(ref))
    r = np.asarray(ref, np.float64)
    diff = float(np.abs(g - r).max(initial=0.0))
    scale = float(np.abs(r).max(initial=0.0)) or 1.0
    return {"max_abs_err": diff, "max_rel_err": diff / scale}


def compare(
    got: Any, ref: Any, mask: Any = None, *, logits: bool = False, tie_gap: float | None = 1e-4
) -> dict[str, Any]:
    """Error figures of ``got`` vs ``ref`` ([..., features]) over the tokens where ``mask`` is 1."""
    got, ref = np.asarray(got), np.asarray(ref)
    g = np.asarray(got, dtype=np.float64).reshape(-1, got.shape[-1])
    r = np.asarray(ref, dtype=np.float64).reshape(-1, ref.shape[-1])
    if mask is not None:
        keep = np.asarray(mask).reshape(-1).astype(bool)
        g, r = g[keep], r[keep]
    diff = g - r
    gn, rn = np.linalg.norm(g, axis=-1), np.linalg.norm(r, axis=-1)
    # Cosine says nothing about (near-)zero vectors (a padding-id embedding row is all zeros):
    # those tokens are left to max_abs / rel_l2.
    sized = rn > 1e-6 * max(float(rn.max(initial=0.0)), 1e-30)
    cos = (g * r).sum(-1)[sized] / np.maximum(gn[sized] * rn[sized], 1e-30)
    fig: dict[str, Any] = {
        "tokens": int(r.shape[0]),
        "max_abs": float(np.abs(diff).max(initial=0.0)),
        "rel_l2": float(np.linalg.norm(diff) / max(float(np.linalg.norm(r)), 1e-30)),
        "min_cosine": float(cos.min()) if cos.size else 1.0,
    }
    if logits:
        fig.update(top1_agreement(g, r, tie_gap if tie_gap is not None else 1e-4))
    return fig


def top1_agreement(got: np.ndarray, ref: np.ndarray, tie_gap: float) -> dict[str, Any]:
    """``top1`` over the tokens whose reference top-1/top-2 gap exceeds ``tie_gap * max|ref|``
    (closer ones are counted apart as ``ambiguous``: any rounding may flip them)."""
    if ref.shape[0] == 0:
        return {"top1": 1.0, "top1_all": 1.0, "ambiguous": 0}
    top2 = np.sort(ref, axis=-1)[:, -2:] if ref.shape[-1] > 1 else np.concatenate([ref, ref], axis=-1)
    gap = top2[:, 1] - top2[:, 0]
    ambiguous = gap <= tie_gap * max(float(np.abs(ref).max()), 1e-30)
    agree = got.argmax(-1) == ref.argmax(-1)
    clear = ~ambiguous
    return {
        "top1": float(agree[clear].mean()) if clear.any() else 1.0,
        "top1_all": float(agree.mean()),
        "ambiguous": int(ambiguous.sum()),
    }


def kl_divergence(ref_logits: Any, got_logits: Any) -> np.ndarray:
    """KL(softmax(ref) || softmax(got)) per row, in nats, computed in float64."""
    r = np.asarray(ref_logits, np.float64)
    g = np.asarray(got_logits, np.float64)
    log_p = r - r.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = g - g.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)


def compare_logits(got: Any, ref: Any, mask: Any = None, *, tie_gap: float | None = 1e-4) -> dict[str, Any]:
    """``compare`` for logits plus the next-token KL (mean and max over the real tokens)."""
    got, ref = np.asarray(got), np.asarray(ref)
    fig = compare(got, ref, mask, logits=True, tie_gap=tie_gap)
    g = got.reshape(-1, got.shape[-1])
    r = ref.reshape(-1, ref.shape[-1])
    if mask is not None:
        keep = np.asarray(mask).reshape(-1).astype(bool)
        g, r = g[keep], r[keep]
    kl = kl_divergence(r, g)
    fig["kl_mean"] = float(kl.mean()) if kl.size else 0.0
    fig["kl_max"] = float(kl.max()) if kl.size else 0.0
    return fig


def merge(figs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The worst case over several comparisons (top-1 weighted by token count)."""
    out: dict[str, Any] = {
        "tokens": sum(f["tokens"] for f in figs),
        "max_abs": worst(*(f["max_abs"] for f in figs)),
        "rel_l2": max(f["rel_l2"] for f in figs),
        "min_cosine": min(f["min_cosine"] for f in figs),
    }
    if "top1" in figs[0]:
        out["top1"] = min(f["top1"] for f in figs)
        out["top1_all"] = sum(f["top1_all"] * f["tokens"] for f in figs) / max(out["tokens"], 1)
        out["ambiguous"] = sum(f["ambiguous"] for f in figs)
    if "kl_max" in figs[0]:
        out["kl_max"] = max(f["kl_max"] for f in figs)
        out["kl_mean"] = sum(f["kl_mean"] * f["tokens"] for f in figs) / max(out["tokens"], 1)
    return out


def worst(*errors: float) -> float:
    """The largest error, NaN when any is NaN (Python's ``max`` would drop a NaN that is not
    first, and an overflow would show as an error of 0)."""
    if any(math.isnan(e) for e in errors):
        return math.nan
    return max(errors)


class ErrorAccumulator:
    """``max_abs``, ``rel_l2`` and ``cosine`` (of the flattened outputs) over many batches."""

    def __init__(self) -> None:
        self.err2 = self.ref2 = self.out2 = self.dot = 0.0
        self.max_abs = 0.0
        self.tokens = 0

    def add(self, got: Any, ref: Any) -> None:
        y = np.asarray(got, np.float64)
        r = np.asarray(ref, np.float64)
        d = y - r
        self.err2 += float((d * d).sum())
        self.ref2 += float((r * r).sum())
        self.out2 += float((y * y).sum())
        self.dot += float((y * r).sum())
        self.max_abs = worst(self.max_abs, float(np.abs(d).max(initial=0.0)))
        self.tokens += int(np.prod(y.shape[:-1]))

    @property
    def rel_l2(self) -> float:
        if self.ref2 == 0:
            return 0.0 if self.err2 == 0 else math.inf
        return math.sqrt(self.err2 / self.ref2)

    @property
    def cosine(self) -> float:
        if self.ref2 == 0 or self.out2 == 0:
            return 1.0 if self.ref2 == self.out2 else 0.0
        return self.dot / math.sqrt(self.ref2 * self.out2)

    def figures(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "max_abs": self.max_abs, "rel_l2": self.rel_l2, "cosine": self.cosine}


def log_softmax(logits: Any) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def perplexity(logits: Any, ids: Any) -> float:
    """exp(mean next-token negative log-likelihood): logits [seq, vocab] at positions 0..n-2
    predict ids 1..n-1 (one window of real text, no padding)."""
    lp = log_softmax(np.asarray(logits)[:-1])
    nxt = np.asarray(ids)[1:]
    return float(np.exp(-lp[np.arange(len(nxt)), nxt].mean()))


def next_token_quality(got: Sequence[Any], ref: Sequence[Any], ids: Sequence[Any]) -> dict[str, Any]:
    """Figures of a model's logits against the float reference's on windows of real text:

    - ``agreement``: next-token top-1 agreement over every position (no tie filter: what a
      greedy decoder would pick differently);
    - ``perplexity`` and ``perplexity_reference`` of the text (over all windows' predictions), and
      ``perplexity_ratio`` = got / reference.
    """
    agree = []
    nll_got: list[np.ndarray] = []
    nll_ref: list[np.ndarray] = []
    for g, r, t in zip(got, ref, ids):
        g, r, t = np.asarray(g), np.asarray(r), np.asarray(t)
        agree.append(g.argmax(-1) == r.argmax(-1))
        idx = np.arange(len(t) - 1)
        nll_got.append(-log_softmax(g[:-1])[idx, t[1:]])
        nll_ref.append(-log_softmax(r[:-1])[idx, t[1:]])
    ppl = float(np.exp(np.concatenate(nll_got).mean()))
    ppl_ref = float(np.exp(np.concatenate(nll_ref).mean()))
    return {
        "tokens": int(sum(a.size for a in agree)),
        "agreement": float(np.concatenate(agree).mean()),
        "perplexity": ppl,
        "perplexity_reference": ppl_ref,
        "perplexity_ratio": ppl / ppl_ref,
    }
