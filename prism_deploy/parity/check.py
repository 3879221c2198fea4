"""Parity: a lowered graph (or any runner) against the PyTorch reference, with tolerances.

``check_parity(adapter, runner_or_onnx_path, ...)`` feeds the same inputs to the runner and to
``PrismAdapter.forward`` and reports error figures, per gated pipe the agreement of the
selected worker sets, and the workers whose stored tile deviates most from the reference
tile (each tile evaluated alone on the same inputs). docs/precision.md explains the figures
and the default tolerances.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from prism_deploy.core.errors import CheckFailed, PrismInputError
from prism_deploy.core.metrics import ErrorAccumulator
from prism_deploy.core.precision import Precision
from prism_deploy.core.tiles import stored_as
from prism_deploy.core.tolerances import Tolerances
from prism_deploy.core.tolerances import adapter as adapter_tolerances
from prism_deploy.parity.blame import worker_errors
from prism_deploy.reference import PrismAdapter
from prism_deploy.target_backends import AdapterRunner

# Tolerances per precision: prism_deploy.core.tolerances.adapter (docs/precision.md gives the
# reasons); score_rounding there is the size of a rounding error in a gate score, which decides
# when a token's selection is ambiguous.
GRAM_ROWS = 8192  # input rows used for the per-worker error (a Gram matrix per column-block)


@dataclass
class ParityReport:
    precision: Precision
    runner: str
    tokens: int
    max_abs: float
    rel_l2: float
    cosine: float
    selection: list[dict[str, Any]]
    top_workers: list[dict[str, Any]]
    tolerances: dict[str, float]
    passed: bool
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def default_tolerances(precision: str, io_dtype: str = "float32") -> dict[str, float]:
    return adapter_tolerances(precision, io_dtype).to_json()


def check_parity(
    adapter: PrismAdapter,
    runner_or_onnx_path: AdapterRunner | str | os.PathLike[str],
    *,
    precision: Precision | str | None = None,
    inputs: np.ndarray | str | os.PathLike[str] | None = None,
    samples: int = 4,
    batch: int = 2,
    seq: int = 16,
    seed: int = 0,
    tolerances: dict[str, float] | None = None,
    provider: str = "cpu",
) -> ParityReport:
    tolerance_overrides = tolerances  # the argument's name is the public API; the module is imported apart
    """Compare a runner (``.run(hidden) -> adapted``) or an ONNX file with the reference.

    ``precision`` defaults to the runner's own (``runner.precision``, read from the graph's
    metadata by ``AdapterGraph``). Inputs: ``samples`` batches of ``[batch, seq, in_dim]``
    standard normal values from ``seed``, or the rows of ``inputs`` (``[n, in_dim]`` array or
    .npy/.npz/.safetensors file), fed ``batch*seq`` rows at a time.
    """
    runner: Any = runner_or_onnx_path
    if isinstance(runner_or_onnx_path, (str, os.PathLike)):
        from prism_deploy.runtime.adapter_session import AdapterGraph

        runner = AdapterGraph(runner_or_onnx_path, provider)
    check_lowered_from(adapter, getattr(runner, "metadata", None), getattr(runner, "path", None))
    named = precision or getattr(runner, "precision", None)
    if named is None:
        raise PrismInputError("check_parity: give precision= (the runner does not say which it runs)")
    prec = Precision.parse(named, "precision")  # the check's edge: a name from a caller or a manifest
    io_dtype = np.dtype(getattr(runner, "io_dtype", np.float32)).name
    tol = default_tolerances(prec, io_dtype)
    tol.update(tolerance_overrides or {})
    batches = list(_input_batches(adapter.in_dim, inputs, samples, batch, seq, seed))
    if not batches:
        raise PrismInputError("parity: no input rows")

    acc = ErrorAccumulator()
    gated = [i for i, p in enumerate(adapter.config.pipes) if p.gated]
    sel_counts = {i: [0, 0, 0] for i in gated}  # tokens, ambiguous, matched (unambiguous)
    have_selections = hasattr(runner, "run_with_selections")
    gram_rows: list[np.ndarray] = []
    for x in batches:
        x_io = x.astype(io_dtype)
        x_ref = torch.from_numpy(x_io.astype(np.float32))
        with torch.no_grad():
            ref = adapter(x_ref).numpy()
        if have_selections:
            y, selections = runner.run_with_selections(x_io)
        else:
            y, selections = np.asarray(runner.run(x_io)), {}
        if y.shape != ref.shape:
            raise PrismInputError(f"parity: the runner returned shape {list(y.shape)}, expected {list(ref.shape)}")
        acc.add(np.asarray(y, dtype=np.float64), ref.astype(np.float64))
        x2 = x_ref.reshape(-1, adapter.in_dim)
        if gated and selections:
            routings = adapter.routings(x2)
            for i in gated:
                if i in selections:
                    _count_selections(adapter, i, x2, routings[i], selections[i], tol["score_rounding"], sel_counts[i])
        if sum(len(r) for r in gram_rows) < GRAM_ROWS:
            gram_rows.append(x2.numpy())

    notes: list[str] = []
    selection: list[dict[str, Any]] = []
    for i in gated:
        tokens, ambiguous, matched = sel_counts[i]
        spec = adapter.config.pipes[i]
        if tokens == 0:  # the runner gave no selections for this pipe
            selection.append(
                {
                    "pipe": i,
                    "name": spec.name,
                    "top_k": spec.top_k,
                    "tokens": None,
                    "ambiguous": None,
                    "match_fraction": None,
                }
            )
            continue
        clear = tokens - ambiguous
        selection.append(
            {
                "pipe": i,
                "name": spec.name,
                "top_k": spec.top_k,
                "tokens": tokens,
                "ambiguous": ambiguous,
                "match_fraction": matched / clear if clear else 1.0,
            }
        )
    if any(s["tokens"] is None for s in selection):
        notes.append(
            "the runner does not expose the selected workers of every gated pipe: "
            "selection match not measured for those"
        )

    stored, how = _stored_tiles(runner, adapter, prec)
    notes.append(f"per-worker errors: {how}")
    x_all = np.concatenate(gram_rows)[:GRAM_ROWS]
    top = worker_errors(adapter, stored, x_all, notes)

    failures = Tolerances(**tol).failures(acc.figures())
    for s in selection:
        if s["match_fraction"] is not None and s["match_fraction"] < tol["selection_match_min"]:
            failures.append(
                f"pipe {s['name']!r}: selection match {s['match_fraction']:.4f} < {tol['selection_match_min']}"
            )
    return ParityReport(
        precision=prec,
        runner=_describe(runner),
        tokens=acc.tokens,
        max_abs=acc.max_abs,
        rel_l2=acc.rel_l2,
        cosine=acc.cosine,
        selection=selection,
        top_workers=top,
        tolerances=tol,
        passed=not failures,
        failures=failures,
        notes=notes,
    )


# ---- pieces ------------------------------------------------------------------------------


def _input_batches(
    in_dim: int, inputs: np.ndarray | str | os.PathLike[str] | None, samples: int, batch: int, seq: int, seed: int
) -> Any:
    for name, v in (("samples", samples), ("batch", batch), ("seq", seq)):
        if v < 1:
            raise PrismInputError(f"--{name} must be >= 1, got {v}")
    if inputs is None:
        rng = np.random.default_rng(seed)
        for _ in range(samples):
            yield rng.standard_normal((batch, seq, in_dim)).astype(np.float32)
        return
    if isinstance(inputs, np.ndarray):
        rows, label = inputs, "inputs"
    else:
        from prism_deploy.core.data import load_matrix

        rows, label = load_matrix(inputs), str(inputs)
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim == 3:
        rows = rows.reshape(-1, rows.shape[-1])
    if rows.ndim != 2 or rows.shape[1] != in_dim:
        raise PrismInputError(f"{label}: inputs must be [n, {in_dim}], got {list(rows.shape)}")
    if not np.isfinite(rows).all():
        raise PrismInputError(f"{label}: inputs hold NaN or Inf")
    step = batch * seq
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        yield chunk.reshape(batch, seq, in_dim) if chunk.shape[0] == step else chunk[None]


def check_lowered_from(adapter: PrismAdapter, metadata: dict[str, Any] | None, graph: Any) -> None:
    """A graph is compared only with the adapter it was lowered from (recorded in its metadata
    by ``export``): another layout is bad input, other weights of the same layout a failed
    check, said before any number is compared (blame would name workers of the wrong adapter)."""
    record = (metadata or {}).get("adapter")
    if not isinstance(record, dict):
        return  # lowered before graphs recorded their adapter
    name = graph or "the graph"
    if record.get("topology") != adapter.config.topology():
        raise PrismInputError(
            f"{name}: lowered from an adapter of another layout than this one "
            f"(pipes {_pipes(record.get('topology'))} vs {_pipes(adapter.config.topology())})"
        )
    digest = adapter.arrays().content_digest()
    if record.get("digest") != digest:
        raise CheckFailed(
            f"{name}: lowered from another adapter of the same layout (weights {str(record.get('digest'))[7:19]} "
            f"in the graph, {digest[7:19]} here); export this adapter again to check it"
        )


def _pipes(topology: Any) -> str:
    pipes = topology.get("pipes", []) if isinstance(topology, dict) else []
    return (
        ", ".join(f"{p.get('name')} {_x(p.get('grid'))} of {_x(p.get('tile'))}" for p in pipes if isinstance(p, dict))
        or "?"
    )


def _x(pair: Any) -> str:
    return "x".join(str(v) for v in pair) if isinstance(pair, list) else "?"


def _count_selections(
    adapter: PrismAdapter, i: int, x2: torch.Tensor, routing: Any, got: np.ndarray, rounding: float, counts: list[int]
) -> None:
    """Add to ``counts`` = [tokens, ambiguous, matched among unambiguous] for pipe ``i``."""
    pipe = adapter.pipe_list()[i]
    k = pipe.spec.top_k
    assert k is not None and pipe.gate is not None
    n = x2.shape[0]
    counts[0] += n
    ref_idx = routing.indices.numpy()
    if k < pipe.spec.workers:
        s = torch.sort(routing.scores, dim=-1, descending=True).values
        gap = (s[:, k - 1] - s[:, k]).numpy()
        # rounding errors of the in_dim products add up like a random walk: the size of a
        # score's error is about rounding * ||x * max_w |g_w|||_2 (plus the bias's rounding)
        w_max = pipe.gate.weight.to(torch.float32).abs().amax(dim=0)
        bound = rounding * ((x2 * w_max).norm(dim=1).numpy() + float(pipe.gate.bias.abs().max()))
        ambiguous = gap <= bound
    else:
        ambiguous = np.zeros(n, dtype=bool)
    same = np.sort(ref_idx, axis=1) == np.sort(got.reshape(n, -1), axis=1)
    matched = same.all(axis=1)
    counts[1] += int(ambiguous.sum())
    counts[2] += int((matched & ~ambiguous).sum())


def _stored_tiles(runner: Any, adapter: PrismAdapter, precision: Precision) -> tuple[dict[int, np.ndarray], str]:
    if hasattr(runner, "stored_tiles"):
        return runner.stored_tiles(), "the runner's stored tiles (dequantized) vs the reference tiles"
    return simulated_stored_tiles(adapter, precision), f"tiles rounded as {precision} stores them vs the reference"


def simulated_stored_tiles(adapter: PrismAdapter, precision: Precision) -> dict[int, np.ndarray]:
    """The tiles as a ``precision`` lowering stores them, as float32 (for runners that do
    not expose their weights, e.g. engines)."""
    return {i: stored_as(pipe.tiles, precision) for i, pipe in enumerate(adapter.pipe_list())}


def _describe(runner: Any) -> str:
    if callable(getattr(runner, "describe", None)):
        return str(runner.describe())
    return type(runner).__name__
