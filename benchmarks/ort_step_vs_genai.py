"""An ``ort``-form last folder and ONNX Runtime GenAI's build of the same model, alternated in one
process with nothing else loaded: decode per step (the whole ``step``, and the graph run
inside it) and prefill, median of per-repetition medians after one warm-up repetition.

    python benchmarks/ort_step_vs_genai.py FOLDER GENAI_DIR THREADS [-o results.json]

GENAI_DIR: a folder of GenAI's model builder for the folder's source model at the same
precision (``bench --model --peer-dir DIR`` keeps them as ``DIR/genai-PRECISION-DIGEST``).
It separates the graph's own time from what ``bench --model`` measures beside a dozen other
runners (docs/model-forms.md, "The issue's targets").
"""

import json
import statistics
import sys
import time

import numpy as np
import onnxruntime_genai as og
from bench_ort_step import _TimedSession

from prism_deploy.bench.machine import load_average
from prism_deploy.runtime.model_stage import ModelStage

folder, gdir, thr = sys.argv[1], sys.argv[2], int(sys.argv[3])
# before each prefill: the other runtime's worker threads, still spinning after its last call,
# would share the cores with the one timed (docs/model-forms.md, "Prefill at 2 threads")
SETTLE_S = float(__import__("os").environ.get("SETTLE_S", "0.05"))
out_path = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == "-o" else None
load_start = load_average()
cfgp = gdir + "/genai_config.json"
c = json.load(open(cfgp))
c["model"]["decoder"]["session_options"]["intra_op_num_threads"] = thr
json.dump(c, open(cfgp, "w"), indent=1)
m = og.Model(gdir)
stage = ModelStage(folder, threads=thr)
graph = stage.graph
table = stage.embed_tokens
rng = np.random.default_rng(0)
ids = rng.integers(1, 32000, (1, 64))
emb = table[ids].astype(np.float32)
steps = [table[rng.integers(1, 32000)].reshape(1, 1, -1).astype(np.float32) for _ in range(32)]


def ours():
    cache = graph.new_cache(1)
    mask = np.ones((1, 64), np.int64)
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    graph.step(emb, mask, cache)
    prefills["ours"].append(time.perf_counter() - t0)
    t = []
    for i, x in enumerate(steps):
        mask = np.ones((1, 65 + i), np.int64)
        t0 = time.perf_counter()
        graph.step(x, mask, cache)
        t.append(time.perf_counter() - t0)
    return statistics.median(t)


def raw_run_only():
    # the same steps, but time run_with_iobinding alone (bench_ort_step's timed session)
    cache = graph.new_cache(1)
    mask = np.ones((1, 64), np.int64)
    graph.step(emb, mask, cache)
    session = graph.session
    graph.session = timed = _TimedSession(session)
    for i, x in enumerate(steps):
        graph.step(x, np.ones((1, 65 + i), np.int64), cache)
    graph.session = session
    return statistics.median(timed.times)


prefills = {"ours": [], "genai": []}


def genai():
    p = og.GeneratorParams(m)
    p.set_search_options(max_length=64 + 33, do_sample=False)
    g = og.Generator(m, p)
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    g.append_tokens(ids.astype(np.int32))
    prefills["genai"].append(time.perf_counter() - t0)
    g.generate_next_token()
    t = []
    for _ in steps:
        t0 = time.perf_counter()
        g.generate_next_token()
        t.append(time.perf_counter() - t0)
    return statistics.median(t)


res = {"ours": [], "ours_run": [], "genai": []}
for r in range(9):
    a = ours()
    b = raw_run_only()
    g = genai()
    if r:
        res["ours"].append(a)
        res["ours_run"].append(b)
        res["genai"].append(g)
summary = {
    k: {"median_ms": round(statistics.median(v) * 1e3, 3), "min_ms": round(min(v) * 1e3, 3)} for k, v in res.items()
}
summary.update(
    {
        f"prefill_{k}": {"median_ms": round(statistics.median(v[1:]) * 1e3, 2), "min_ms": round(min(v[1:]) * 1e3, 2)}
        for k, v in prefills.items()
    }
)
for k, v in summary.items():
    print(k, v)
if out_path:
    record = {
        "folder": folder,
        "genai": gdir,
        "threads": thr,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "command": " ".join(["python", *sys.argv]),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "decode_and_prefill": summary,
    }
    import pathlib

    prev = json.loads(pathlib.Path(out_path).read_text()) if pathlib.Path(out_path).exists() else []
    pathlib.Path(out_path).write_text(json.dumps([*prev, record], indent=1) + "\n")
