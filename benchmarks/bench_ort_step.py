"""Where an ``ort``-form decode step's time goes: the whole ``step`` call against the
``session.run_with_iobinding`` inside it (the rest is the Python loop around the graph).

    python benchmarks/bench_ort_step.py FOLDER [--threads 1] [--prompt 64] [--steps 64]
        [--repeats 5] [--label before] [-o results.json]

FOLDER is a ``last`` export in the ``ort`` form (``export-model --graph-form ort``). Batch 1,
greedy tokens from a random prompt of embeddings; the first repetition is a warm-up and is
dropped. Prints and writes min / median per step of both, and the share of the graph run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np


class _TimedSession:
    """The session, with ``run_with_iobinding`` timed (everything else passed through)."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.times: list[float] = []

    def run_with_iobinding(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = self._session.run_with_iobinding(*args, **kwargs)
        self.times.append(time.perf_counter() - t)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def measure(folder: str, threads: int, prompt: int, steps: int, repeats: int) -> dict[str, Any]:
    from prism_deploy.runtime.model_stage import ModelStage

    stage = ModelStage(folder, threads=threads)
    graph = stage.graph
    timed = _TimedSession(graph.session)
    graph.session = timed
    table = stage.embed_tokens
    rng = np.random.default_rng(0)
    emb = table[rng.integers(0, table.shape[0], (1, prompt))].astype(np.float32)
    step_ms: list[float] = []
    run_ms: list[float] = []
    for rep in range(repeats + 1):
        cache = stage.empty_past(1)
        mask = np.ones((1, prompt), dtype=np.int64)
        logits, cache = stage.step(emb, mask, cache)
        for _ in range(steps):
            token = logits.argmax(-1)
            x = np.asarray(table[token])[:, None, :]
            mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
            timed.times.clear()
            t = time.perf_counter()
            logits, cache = stage.step(x, mask, cache)
            dt = time.perf_counter() - t
            if rep:
                step_ms.append(dt * 1e3)
                run_ms.append(timed.times[0] * 1e3)
    med_step, med_run = statistics.median(step_ms), statistics.median(run_ms)
    return {
        "threads": threads,
        "prompt": prompt,
        "steps": steps,
        "repeats": repeats,
        "step_ms_min": min(step_ms),
        "step_ms_median": med_step,
        "run_with_iobinding_ms_min": min(run_ms),
        "run_with_iobinding_ms_median": med_run,
        # per step, the step's time outside the graph run: its median is steadier than a
        # difference of medians when the machine is loaded
        "overhead_ms_median": statistics.median(s - r for s, r in zip(step_ms, run_ms)),
        "overhead_ms_min": min(s - r for s, r in zip(step_ms, run_ms)),
        "run_share_median": statistics.median(r / s for s, r in zip(step_ms, run_ms)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--label", default="")
    parser.add_argument("-o", "--out")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    result = measure(args.folder, args.threads, args.prompt, args.steps, args.repeats)
    result.update(
        label=args.label,
        loadavg_before=load_before,
        loadavg_after=os.getloadavg(),
        cpus=os.cpu_count(),
        machine=platform.platform(),
        command=" ".join(sys.argv),
    )
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
