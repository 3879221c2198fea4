"""Timing one case: warm-up first, then ``repeat`` timed calls over rotating input buffers.

- CPU: each call timed alone with the monotonic ``perf_counter_ns`` clock.
- GPU: CUDA events around each call on the current stream; for backends that can be
  captured (torch), small cases replay a CUDA graph per input buffer so that Python and
  launch overhead do not hide the kernel time. (Written for the lent GPU; this CPU machine
  never runs it.)

Rotating buffers: ``inputs`` holds several different arrays, used in turn, so a backend
never sees the same input twice in a row and caches hold no flattering copy of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from prism_deploy.core.tiles import ceil_div

# Few enough that setup stays cheap, enough that consecutive calls never share an input.
MIN_BUFFERS = 4
MAX_BUFFERS = 16
# Together the buffers should outgrow a server CPU's last-level cache.
ROTATION_BYTES = 64 * 1024 * 1024
GRAPH_MAX_TOKENS = 64


def buffer_count(bytes_per_input: int) -> int:
    want = ceil_div(ROTATION_BYTES, max(1, bytes_per_input))
    return int(min(MAX_BUFFERS, max(MIN_BUFFERS, want)))


def summarize(samples_ns: Sequence[int]) -> dict[str, float]:
    s = np.asarray(samples_ns, dtype=np.float64) * 1e-9
    return {
        "median_s": float(np.median(s)),
        "p10_s": float(np.percentile(s, 10)),
        "p90_s": float(np.percentile(s, 90)),
        "mean_s": float(s.mean()),
        "min_s": float(s.min()),
        "samples": int(s.size),
    }


def time_cpu(run: Callable[[Any], Any], inputs: Sequence[Any], warmup_ms: float, repeat: int) -> dict[str, Any]:
    """Warm up for ``warmup_ms`` (at least one call per buffer), then time ``repeat`` calls."""
    k = len(inputs)
    first_call_s, calls = _warm_up(run, inputs, warmup_ms)
    samples = []
    for i in range(repeat):
        x = inputs[(calls + i) % k]
        t = time.perf_counter_ns()
        run(x)
        samples.append(time.perf_counter_ns() - t)
    return {
        **summarize(samples),
        "warmup_calls": calls,
        "first_call_s": first_call_s,
        "buffers": k,
        "method": "cpu perf_counter_ns per call",
    }


def time_cuda(
    run: Callable[[Any], Any],
    inputs: Sequence[Any],
    warmup_ms: float,
    repeat: int,
    use_graph: bool = False,
) -> dict[str, Any]:
    """CUDA events per call; with ``use_graph``, replay one captured graph per buffer."""
    import torch

    k = len(inputs)
    first_call_s, calls = _warm_up(run, inputs, warmup_ms, sync=torch.cuda.synchronize)
    method = "cuda events per call"
    step: Callable[[int], Any] = lambda i: run(inputs[i % k])  # noqa: E731
    if use_graph:
        graphs = _capture_graphs(run, inputs)
        if graphs is not None:
            step = lambda i: graphs[i % k].replay()  # noqa: E731
            method = "cuda graph replay per buffer, cuda events per call"
            for i in range(k):
                step(i)
            torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for i in range(repeat):
        starts[i].record()
        step(calls + i)
        ends[i].record()
    torch.cuda.synchronize()
    samples = [int(s.elapsed_time(e) * 1e6) for s, e in zip(starts, ends)]
    return {**summarize(samples), "warmup_calls": calls, "first_call_s": first_call_s, "buffers": k, "method": method}


def _warm_up(
    run: Callable[[Any], Any], inputs: Sequence[Any], warmup_ms: float, sync: Callable[[], Any] = lambda: None
) -> tuple[float, int]:
    """Time the first call alone (loading, compilation), then call for ``warmup_ms`` and at
    least once per buffer. Returns (first call seconds, calls made)."""
    k = len(inputs)
    t0 = time.perf_counter_ns()
    run(inputs[0])
    sync()
    first_call_s = (time.perf_counter_ns() - t0) * 1e-9
    calls = 1
    deadline = time.perf_counter_ns() + int(warmup_ms * 1e6)
    while calls < k or time.perf_counter_ns() < deadline:
        run(inputs[calls % k])
        calls += 1
    sync()
    return first_call_s, calls


def _capture_graphs(run: Callable[[Any], Any], inputs: Sequence[Any]) -> list[Any] | None:
    """One CUDA graph per input buffer (the graph's inputs are fixed addresses)."""
    import torch

    graphs = []
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for x in inputs:  # a side-stream warm-up, as torch.cuda.graphs asks
                run(x)
        torch.cuda.current_stream().wait_stream(stream)
        for x in inputs:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run(x)
            graphs.append(g)
    except Exception:  # not capturable (host sync, dynamic allocation): fall back to events
        return None
    return graphs
