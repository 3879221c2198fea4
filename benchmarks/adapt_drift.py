"""Adaptation under drift, measured with `prism-deploy adapt` on tiny random models (docs/adaptation.md).

    python benchmarks/adapt_drift.py [--prose 400] [--json FILE]

An 8-worker adapter from the tests' Llama (hidden 64) to their Qwen2 (embeddings 96) is fitted
on pairs collected from prose (the language reference's text in ``pydoc_data.topics``), built
(ort-cpu fp32, parity checked) and written as a repository. Traffic then drifts to source code
(the lines of ``json.encoder`` and ``json.decoder``), recorded as ``serve --record`` records it.
Each configuration runs one `adapt` round on its own copy of the repository (``--no-load``: the
hot-swap itself is tested in tests/serving/test_adapt.py) and reports the round's log record:
errors before and after on the recorded held-out texts and on the original held-out set, and
the decision. Random models: the figures show the loop's behaviour, not a trained pair's errors.
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = [
    ("worst 2, margin 0.05", ["--top", "2", "--margin", "0.05"]),
    ("worst 4, margin 0.05", ["--top", "4", "--margin", "0.05"]),
    ("worst 4, margin 0.2", ["--top", "4", "--margin", "0.2"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prose", type=int, default=400, help="prose lines the adapter is fitted on")
    parser.add_argument("--max-seq", type=int, default=64)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    import json.decoder
    import json.encoder
    import pydoc_data.topics as topics

    from prism_deploy.cli.main import main as cli
    from prism_deploy.fit import FitOptions, PairedData, fit_adapter, fit_config
    from prism_deploy.models.collect import collect_pairs, save_pairs
    from prism_deploy.serving import record
    from tests.adapt_helpers import record_texts
    from tests.model_helpers import make_model

    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="adapt-drift-"))
    try:
        llama, qwen2 = make_model("llama", tmp / "llama"), make_model("qwen2", tmp / "qwen2")
        prose = [
            line.strip()
            for key in sorted(topics.topics)
            for line in topics.topics[key].splitlines()
            if len(line.strip()) > 30
        ]
        prose = [prose[i] for i in np.random.default_rng(0).permutation(len(prose))[: args.prose]]
        code = [
            line.strip()
            for mod in (json.encoder, json.decoder)
            for line in inspect.getsource(mod).splitlines()
            if len(line.strip()) > 20
        ]
        x, z, info = collect_pairs(llama, qwen2, prose, pool="tokens", max_seq=args.max_seq, progress=False)
        pairs = tmp / "pairs.safetensors"
        save_pairs(pairs, x, z, info)
        data = PairedData(f"{pairs}:X", f"{pairs}:Z", holdout=0.1)
        adapter, report = fit_adapter(fit_config(64, 96, workers=8, top_k=None), data, FitOptions(method="joint"))
        fitted = tmp / "fitted.safetensors"
        adapter.save(fitted)
        assert cli(["build", str(fitted), "-o", str(tmp / "build"), "--target", "ort-cpu", "--precision", "fp32"]) == 0
        assert cli(["triton", str(tmp / "build"), "-o", str(tmp / "repo")]) == 0
        records = record.prepare_folder(tmp / "records")
        record_texts(records, llama, code)
        rounds = []
        for name, extra in CONFIGS:
            repo = tmp / f"repo-{len(rounds)}"
            shutil.copytree(tmp / "repo", repo)
            code_rc = cli(
                [
                    "adapt",
                    str(repo),
                    "--from",
                    str(records),
                    "--model-a",
                    str(llama),
                    "--model-b",
                    str(qwen2),
                    "--original",
                    str(pairs),
                    "--adapter",
                    str(fitted),
                    "--max-seq",
                    str(args.max_seq),
                    "--no-load",
                    "--json",
                    *extra,
                ]
            )
            [entry] = json.loads((repo / "prism-adapt-log.json").read_text())
            rounds.append({"config": name, "exit": code_rc, **entry})
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "prose_lines": len(prose),
            "code_lines": len(code),
            "original_pairs": int(x.shape[0]),
            "fit_report": report.to_json(),
            "rounds": rounds,
            "seconds": round(time.time() - started, 1),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'config':24} {'recorded before':>16} {'after':>8} {'original before':>16} {'after':>8}  decision")
    for r in rounds:
        after = r["after"] or {}
        cands = ", ".join(
            f"{c['name']}: {c['recorded_rel_err']:.4f}/{c['original_rel_err']:.4f}" for c in r["candidates"]
        )
        print(
            f"{r['config']:24} {r['before']['recorded']:16.4f} {after.get('recorded', float('nan')):8.4f} "
            f"{r['before']['original']:16.4f} {after.get('original', float('nan')):8.4f}  {r['decision']}"
            f" ({cands})"
        )
    if args.json:  # the temporary folder is gone: its paths are written as <tmp>
        Path(args.json).write_text(json.dumps(result, indent=1).replace(str(tmp), "<tmp>") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
