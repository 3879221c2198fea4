"""Decode and prefill of one last model in its two graph forms beside ONNX Runtime GenAI
(docs/model-forms.md), at 1 and 2 threads, into one results JSON.

    python benchmarks/bench_forms.py --hf build/bench-models/model-b \\
        build/b-last-fp32 build/b-last-ort-fp32 build/b-last-int4 build/b-last-ort-int4 \\
        -o benchmarks/results/DATE-cpu-model-b-forms.json

The folders are `export-model --role last` outputs (portable and `--graph-form ort`); the
GenAI models are built once per precision by its model builder into a scratch folder and
reused for every thread count. Each thread count is one `bench --model` run
(prism_deploy.bench.models), interleaved, with the load average recorded: read the load before
the figures.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("folders", nargs="+")
    p.add_argument("--hf", required=True)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args()
    from prism_deploy.bench.models import _run_model_bench
    from prism_deploy.core.fsutil import write_text_atomic

    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-forms-") as scratch:
        for threads in (int(t) for t in args.threads.split(",")):
            runs[str(threads)] = _run_model_bench(
                args.folders,
                threads=threads,
                prompt=args.prompt,
                new_tokens=args.new_tokens,
                repeat=args.repeat,
                warmup=1,
                seed=0,
                eager=True,
                hf_dir=args.hf,
                peers=True,
                scratch=Path(scratch),
            )
    summary = {
        t: {
            c["name"]: {
                "decode_ms_median": c["decode"]["median_s"] * 1e3,
                "decode_ms_min": c["decode"]["min_s"] * 1e3,
                "prefill_ms_median": c["prefill"]["median_s"] * 1e3,
                "unstable": c["unstable"],
            }
            for c in r["cases"]
        }
        for t, r in runs.items()
    }
    result = {
        "kind": "model-forms-bench",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "load_average": {
            t: {k: r["machine"][k] for k in ("load_average_start", "load_average_timed", "load_average_end")}
            for t, r in runs.items()
        },
        "summary_by_threads": summary,
        "runs_by_threads": runs,
    }
    # paths as the command gave them: relative to the repository, nothing of this machine's
    write_text_atomic(args.output, json.dumps(result, indent=1).replace(str(Path.cwd()) + "/", "") + "\n")
    for t, cases in summary.items():
        print(f"{t} thread(s), load {result['load_average'][t]}")
        for name, c in cases.items():
            print(
                f"  {name:28s} decode {c['decode_ms_median']:8.2f} ms/token (min {c['decode_ms_min']:.2f})  "
                f"prefill {c['prefill_ms_median']:8.1f} ms  {'UNSTABLE ' + '; '.join(c['unstable']) if c['unstable'] else ''}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
