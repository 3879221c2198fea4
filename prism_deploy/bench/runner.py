"""One benchmark run: every available backend on the same inputs, in one process.

Order of work: describe the machine and measure its copy bandwidth and matrix rate; make
the rotating inputs for each batch (the same arrays for every backend) and the reference
output; then per precision prepare each backend and, per batch, time each backend in turn
(interleaved, so that a change of load on a shared machine hits all of them alike).
``torch`` at fp32 is always measured when ``torch`` is asked for: it is the baseline of
every ratio.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.bench import backends as bk
from prism_deploy.bench.floor import FLOOR_MODEL, case_floor
from prism_deploy.bench.machine import describe_machine, load_average, measure_copy_bandwidth, measure_matrix_rate
from prism_deploy.bench.memory import PeakMemory, merge_peaks
from prism_deploy.bench.timing import GRAPH_MAX_TOKENS, buffer_count, time_cpu, time_cuda
from prism_deploy.core import defaults
from prism_deploy.core.errors import PrismInputError, brief
from prism_deploy.core.metrics import max_abs_relative
from prism_deploy.core.precision import Precision

SCHEMA = "prism-deploy-bench/1"
BASELINE = ("torch", "fp32")


@dataclass(frozen=True)
class BenchSettings:
    backends: tuple[str, ...] = bk.BACKEND_NAMES
    precisions: tuple[Precision, ...] = (Precision.FP32,)
    batches: tuple[int, ...] = defaults.BENCH_BATCHES
    seq: int = 1
    warmup_ms: float = 200.0
    repeat: int = 30
    engines_dir: Path | None = None
    seed: int = 0
    threads: int | None = None  # CPU threads for torch and ONNX Runtime; None: each library's default

    def __post_init__(self) -> None:
        # the settings of a run: a precision an API caller names is parsed here (the CLI passes them parsed)
        object.__setattr__(
            self, "precisions", tuple(p if isinstance(p, Precision) else Precision.parse(p) for p in self.precisions)
        )

    def validate(self) -> None:
        for b in self.backends:
            why = bk.check_backend_name(b)
            if why is not None:
                raise PrismInputError(f"--backends: {why}")
        if not self.backends:
            raise PrismInputError("--backends: name at least one backend")
        if not self.precisions:
            raise PrismInputError("--precision: name at least one precision")
        if not self.batches or any(b < 1 for b in self.batches):
            raise PrismInputError(f"--batch: sizes must be positive integers, got {list(self.batches)}")
        if self.seq < 1:
            raise PrismInputError(f"--seq: must be a positive integer, got {self.seq}")
        if self.repeat < 1:
            raise PrismInputError(f"--repeat: must be at least 1, got {self.repeat}")
        if not math.isfinite(self.warmup_ms) or self.warmup_ms < 0:
            raise PrismInputError(f"--warmup: must be a non-negative number of milliseconds, got {self.warmup_ms}")
        if self.threads is not None and self.threads < 1:
            raise PrismInputError(f"--threads: must be a positive integer, got {self.threads}")
        if self.engines_dir is not None and not Path(self.engines_dir).is_dir():
            raise PrismInputError(f"--engines: {self.engines_dir} is not a directory")


@dataclass
class _Inputs:
    arrays: list[np.ndarray]
    reference: np.ndarray  # the fp32 reference's output for arrays[0]
    selected_tiles: list[float | None] = field(default_factory=list)


def make_inputs(adapter: Any, batch: int, seq: int, seed: int) -> _Inputs:
    """Rotating float32 inputs ``[batch, seq, in_dim]``, the reference output and the
    number of distinct tiles each gated pipe selects (mean over the buffers)."""
    import torch

    in_dim = adapter.config.in_dim
    k = buffer_count(batch * seq * in_dim * 4)
    rng = np.random.default_rng([seed, batch, seq])
    arrays = [rng.standard_normal((batch, seq, in_dim), dtype=np.float32) for _ in range(k)]
    with torch.inference_mode():
        reference = adapter(torch.from_numpy(arrays[0])).numpy()
        counts: list[list[int]] = [[] for _ in adapter.config.pipes]
        for x in arrays:
            for i, routing in enumerate(adapter.routings(torch.from_numpy(x))):
                if routing is not None:
                    counts[i].append(int(torch.unique(routing.indices).numel()))
    selected = [float(np.mean(c)) if c else None for c in counts]
    return _Inputs(arrays, reference, selected)


def adapter_content_digest(adapter: Any) -> str:
    """sha256 over the config and every tensor's bytes (by name): what the adapter computes,
    whatever else its file holds (source/target notes, header layout)."""
    data = adapter.arrays()
    h = hashlib.sha256(data.config.dumps().encode())
    for name in sorted(data.tensors):
        t = np.ascontiguousarray(data.tensors[name])
        h.update(name.encode())
        # dtype spelled as torch spells it: digests recorded in benchmarks/results stay comparable
        h.update(f"torch.{t.dtype.name}".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm

        return tqdm(
            total=total, file=sys.stderr, desc="bench", unit="case", leave=False, disable=not sys.stderr.isatty()
        )
    except ImportError:  # pragma: no cover
        return None


def run_bench(adapter_path: str | os.PathLike[str], settings: BenchSettings) -> dict[str, Any]:
    """Run the benchmark and return every figure as one JSON-able dict (see docs/bench.md)."""
    import torch

    from prism_deploy.format import file_sha256
    from prism_deploy.reference import load_adapter

    settings.validate()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)  # before the matrix rate is measured
    adapter = load_adapter(adapter_path)
    info = adapter.describe()
    started = _dt.datetime.now(_dt.timezone.utc)
    load_start = load_average()
    machine = describe_machine()
    device = bk.torch_device()
    bandwidth = measure_copy_bandwidth(device, threads=settings.threads, working_set=int(info["bytes"]))
    rates = {"fp32": measure_matrix_rate(device, "fp32", threads=settings.threads)}
    if device == "cuda":
        rates["fp16"] = measure_matrix_rate(device, "fp16")
    # each precision at the rate of its own compute dtype (float16 where it was measured)
    rate_for = {
        p: rates["fp16" if p.compute_dtype == np.float16 and "fp16" in rates else "fp32"]["flops_per_s"]
        for p in Precision
    }

    inputs = {b: make_inputs(adapter, b, settings.seq, settings.seed) for b in settings.batches}
    floors = {
        (p, b): case_floor(
            adapter.config, info, p, b * settings.seq, bandwidth["bytes_per_s"], rate_for[p], inputs[b].selected_tiles
        )
        for p in sorted({Precision.FP32, *settings.precisions}, key=lambda p: p.rank)
        for b in settings.batches
    }

    unavailable: list[dict[str, Any]] = []
    runnable: list[str] = []
    for name in settings.backends:
        ok, why = bk.BACKEND_CLASSES[bk.split_backend_name(name)[0]].check(settings.engines_dir)
        if ok:
            runnable.append(name)
        else:
            unavailable.append({"backend": name, "precision": None, "reason": why})

    # Precision passes: the asked ones, plus torch fp32 first when torch must give a baseline.
    passes: list[tuple[Precision, list[str]]] = []
    if "torch" in runnable and Precision.FP32 not in settings.precisions:
        passes.append((Precision.FP32, ["torch"]))
    ordered = sorted(settings.precisions, key=lambda p: (p is not Precision.FP32, p.rank))
    passes += [(p, list(runnable)) for p in ordered]

    cases: list[dict[str, Any]] = []
    backend_records: dict[str, dict[str, Any]] = {}
    bar = _progress(sum(len(names) for _, names in passes) * len(settings.batches))
    with tempfile.TemporaryDirectory(prefix="prism-bench-") as tmp:
        workdir = Path(tmp)
        for precision, names in passes:
            prepared: list[bk.Backend] = []
            for name in names:
                backend = bk.make_backend(name, adapter, precision, workdir, settings.engines_dir, settings.threads)
                with PeakMemory(cuda=backend.uses_gpu) as mem:
                    try:
                        backend.prepare()
                    except Exception as exc:  # listed with the reason; the other backends still run
                        why = (
                            str(exc)
                            if isinstance(exc, bk.BackendUnavailable)
                            else f"{name}: preparing {precision} failed ({type(exc).__name__}: {brief(exc, 300)})"
                        )
                        unavailable.append({"backend": name, "precision": precision, "reason": why})
                        if bar is not None:
                            bar.update(len(settings.batches))
                        continue
                rec = backend_records.setdefault(name, {"name": name, "precisions": {}, "memory": None})
                rec["precisions"][precision] = backend.describe()
                rec["memory"] = merge_peaks(rec["memory"], mem.result())
                prepared.append(backend)
            for batch in settings.batches:
                data = inputs[batch]
                for backend in list(prepared):
                    case = _time_case(backend, data, settings, floors[(precision, batch)], batch)
                    if bar is not None:
                        bar.update(1)
                    if "error" in case:
                        unavailable.append(
                            {"backend": backend.name, "precision": precision, "batch": batch, "reason": case["error"]}
                        )
                        continue
                    rec = backend_records[backend.name]
                    rec["memory"] = merge_peaks(rec["memory"], case["memory"])
                    cases.append(case)
            for backend in prepared:
                backend.close()
            prepared.clear()
            gc.collect()
    if bar is not None:
        bar.close()

    _add_ratios(cases)
    finished = _dt.datetime.now(_dt.timezone.utc)
    return {
        "schema": SCHEMA,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": finished.isoformat(timespec="seconds"),
        "adapter": {
            "path": str(adapter_path),
            "sha256": file_sha256(adapter_path),
            "content_sha256": adapter_content_digest(adapter),
            "config": adapter.config.to_json(),
            "describe": {
                k: info[k]
                for k in ("in_dim", "out_dim", "params", "bytes", "flops_per_token", "weight_bytes_per_token")
            },
        },
        "machine": {**machine, "device": device, "load_average_start": load_start, "load_average_end": load_average()},
        "rates": {"copy_bandwidth": bandwidth, "matrix_rate": rates, "floor_model": FLOOR_MODEL},
        "settings": {
            **{k: v for k, v in asdict(settings).items() if k != "engines_dir"},
            "engines_dir": str(settings.engines_dir) if settings.engines_dir else None,
            "baseline": {"backend": BASELINE[0], "precision": BASELINE[1]},
            "torch_threads": torch.get_num_threads(),
        },
        "backends": {
            "asked": list(settings.backends),
            "ran": sorted({c["backend"] for c in cases}),
            "details": list(backend_records.values()),
            "unavailable": unavailable,
        },
        "floors": [{"precision": p, "batch": b, **f} for (p, b), f in floors.items()],
        "cases": cases,
    }


def _time_case(
    backend: bk.Backend, data: _Inputs, settings: BenchSettings, floor: dict[str, Any], batch: int
) -> dict[str, Any]:
    tokens = batch * settings.seq
    try:
        xs = [backend.make_input(a) for a in data.arrays]
        with PeakMemory(cuda=backend.uses_gpu) as mem:
            if backend.device == "cuda":
                timing = time_cuda(
                    backend.run,
                    xs,
                    settings.warmup_ms,
                    settings.repeat,
                    use_graph=backend.capturable and tokens <= GRAPH_MAX_TOKENS,
                )
            else:
                timing = time_cpu(backend.run, xs, settings.warmup_ms, settings.repeat)
        errors = max_abs_relative(backend.to_numpy(backend.run(xs[0])), data.reference)
    except Exception as exc:  # a backend that breaks on one case is reported, not fatal
        return {"error": f"{backend.name} {backend.precision} batch {batch}: {type(exc).__name__}: {brief(exc, 300)}"}
    median = timing["median_s"]
    return {
        "backend": backend.name,
        "precision": backend.precision,
        "batch": batch,
        "seq": settings.seq,
        "tokens": tokens,
        **timing,
        "tokens_per_s": tokens / median if median > 0 else None,
        "floor_s": floor["floor_s"],
        "ratio_to_floor": median / floor["floor_s"],
        "ratio_to_torch": None,
        "memory": mem.result(),
        **errors,
    }


def _add_ratios(cases: list[dict[str, Any]]) -> None:
    """Each case's median over the torch fp32 median at the same batch and seq."""
    base = {(c["batch"], c["seq"]): c["median_s"] for c in cases if (c["backend"], c["precision"]) == BASELINE}
    for c in cases:
        b = base.get((c["batch"], c["seq"]))
        c["ratio_to_torch"] = c["median_s"] / b if b else None
