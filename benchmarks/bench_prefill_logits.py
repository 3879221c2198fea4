"""Prefill time of a ``last`` model with the LM head on every prompt position against the last
position only (``logits_start``, docs/model-forms.md "Prefill logits").

    python benchmarks/bench_prefill_logits.py FOLDER [--baseline OLD_FOLDER] [--threads 1]
        [--prompt 64] [--repeats 10] [-o results.json]

FOLDER is a ``last`` export (either form) whose KV-cache graph takes ``logits_start``. Each
repetition times one prefill (``ModelStage.step`` on a fresh cache, batch 1, a random prompt
of embedding rows) in each mode, interleaved: ``all`` (``logits_start`` not fed: every
position, as the graph computed before) and ``last`` (fed -1, what generation now does).
``--baseline`` adds the same model exported before the change (no ``logits_start``), timed in
the same interleaving. The first repetition is a warm-up and is dropped; min and median are
printed and written with the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np


def _prefill(stage: Any, emb: np.ndarray, mask: np.ndarray, select: bool) -> tuple[float, np.ndarray]:
    from prism_deploy.format.model_folder import LOGITS_START

    if stage.graph_form == "ort":
        stage.graph.selects_positions = select and LOGITS_START in stage.graph.runner.optional_inputs
    else:
        runner = stage.past_graph
        if not hasattr(runner, "_all_optional"):
            runner._all_optional = dict(runner.optional_inputs)
        runner.optional_inputs = runner._all_optional if select else {}
    cache = stage.empty_past(1)
    started = time.perf_counter()
    logits, _ = stage.step(emb, mask, cache)
    return time.perf_counter() - started, np.asarray(logits)


def measure(folder: str, baseline: str | None, threads: int, prompt: int, repeats: int) -> dict[str, Any]:
    from prism_deploy.runtime.model_stage import ModelStage

    stages = {"all": ModelStage(folder, threads=threads)}
    stages["last"] = stages["all"]
    if baseline:
        stages["baseline"] = ModelStage(baseline, threads=threads)
    table = stages["all"].embed_tokens
    ids = np.random.default_rng(0).integers(0, table.shape[0], size=(1, prompt))
    emb = np.asarray(table[ids], dtype=np.float32)
    mask = np.ones((1, prompt), dtype=np.int64)
    times: dict[str, list[float]] = {mode: [] for mode in stages}
    tokens: dict[str, int] = {}
    load_before = os.getloadavg()
    for rep in range(repeats + 1):
        for mode, stage in stages.items():
            took, logits = _prefill(stage, emb, mask, select=mode == "last")
            tokens[mode] = int(logits.argmax(-1)[0])
            if rep:
                times[mode].append(took)
    if len(set(tokens.values())) != 1:
        raise SystemExit(f"the modes disagree on the next token: {tokens}")
    summary = {
        mode: {"min_ms": round(min(t) * 1e3, 2), "median_ms": round(statistics.median(t) * 1e3, 2)}
        for mode, t in times.items()
    }
    return {
        "folder": folder,
        "baseline": baseline,
        "graph_form": stages["all"].graph_form,
        "layers": stages["all"].layers,
        "vocab": stages["all"].vocab,
        "hidden": stages["all"].hidden_size,
        "precision": stages["all"].precision,
        "threads": threads,
        "prompt_tokens": prompt,
        "batch": 1,
        "repeats": repeats,
        "prefill": summary,
        "last_over_all_min": round(summary["last"]["min_ms"] / summary["all"]["min_ms"], 3),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--baseline")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("-o", "--output")
    args = parser.parse_args(argv)
    import onnxruntime

    result = measure(args.folder, args.baseline, args.threads, args.prompt, args.repeats)
    result.update(
        {
            "command": " ".join(["python", *sys.argv]),
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
            "onnxruntime": onnxruntime.__version__,
        }
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:  # a list of runs: each call adds its own
        runs = json.loads(open(args.output, encoding="utf-8").read()) if os.path.exists(args.output) else []
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(json.dumps([*runs, result], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
