"""Quantized SmolLM2-135M on held-out real text: perplexity, next-token top-1 agreement with
fp32, and decode speed, against issue 21's targets (docs/quantized-models.md, "On a real model").

    python benchmarks/quant_real.py [--model HF_DIR] [--work DIR] [--threads 1] [--cases fp32,int8,...]
        [--reps 5] -o benchmarks/results/DATE-cpu-quant-real.json

Each case is ``export-model --role last`` of the model (validation off: this script is the
measurement), then, on ONNX Runtime CPU with the same intra-op threads for every case:

- quality: ``last.onnx`` over the held-out part of the default corpus (``prism_deploy.core.corpus``;
  calibration uses its calibration part) in windows of 256 tokens: perplexity of the text, and how often
  the case's next-token argmax equals fp32's;
- speed: ``last_with_past.onnx``, a 64-token prompt then 32 greedy steps (one token each, the KV
  cache fed back), the cases interleaved in each repetition; the median step time.

The model defaults to the real-model cache (``prism_deploy.models.real``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name -> (precision, make_spec options); fp32 has no spec
CASES = {
    "fp32": ("fp32", None),
    "int8": ("int8", {}),
    "int8-level0": ("int8", {"accuracy_level": 0}),
    "int8-mixed": ("int8", {"mixed": True}),
    "int4-rtn": ("int4", {}),
    "int4-rtn-asym": ("int4", {"symmetric": False}),
    "int4-hqq": ("int4", {"algorithm": "hqq"}),
    "int4-hqq-mixed": ("int4", {"algorithm": "hqq", "mixed": True}),
    "int4-k_quant": ("int4", {"algorithm": "k_quant"}),
    "int4-gptq": ("int4", {"algorithm": "gptq"}),
    "int4-mixed": ("int4", {"mixed": True}),
    "int4-k_quant-mixed": ("int4", {"algorithm": "k_quant", "mixed": True}),
}
TARGETS = {
    "int8": {"ppl_ratio": 1.02, "top1": 0.97, "decode_speedup": 1.8},
    "int4": {"ppl_ratio": 1.10, "top1": 0.85, "decode_speedup": 2.5},
}
WINDOW = 256


def held_out_ids(tokenizer, windows: int) -> list[np.ndarray]:
    """The default corpus's held-out part (prism_deploy.core.corpus), never used for calibration."""
    from prism_deploy.core import corpus

    ids = np.asarray(tokenizer(corpus.default().text("held_out"))["input_ids"], dtype=np.int64)
    return [ids[i * WINDOW : (i + 1) * WINDOW] for i in range(min(windows, len(ids) // WINDOW))]


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def logits_on(folder: Path, table: np.ndarray, windows: list[np.ndarray], threads: int) -> list[np.ndarray]:
    s = session(folder / "last.onnx", threads)
    return [
        s.run(
            ["logits"],
            {"inputs_embeds": table[w[None]].astype(np.float32), "attention_mask": np.ones((1, len(w)), np.int64)},
        )[0][0]
        for w in windows
    ]


def perplexity(logits: list[np.ndarray], windows: list[np.ndarray]) -> float:
    nll = []
    for lg, w in zip(logits, windows):
        lg = lg[:-1].astype(np.float64)
        top = lg.max(-1, keepdims=True)
        lse = np.log(np.exp(lg - top).sum(-1)) + top[:, 0]
        nll.append(lse - lg[np.arange(len(w) - 1), w[1:]])
    return float(np.exp(np.concatenate(nll).mean()))


def decode_steps(
    folder: Path,
    table: np.ndarray,
    prompt: np.ndarray,
    steps: int,
    threads: int,
    layers: int,
    kv_heads: int,
    head_dim: int,
    sess=None,
) -> tuple[list[float], list[int]]:
    s = sess or session(folder / "last_with_past.onnx", threads)
    names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    past = {n: np.zeros((1, kv_heads, 0, head_dim), np.float32) for n in names}
    emb = table[prompt[None]].astype(np.float32)
    total = len(prompt)
    times, tokens = [], []
    outs = s.run(None, {"inputs_embeds": emb, "attention_mask": np.ones((1, total), np.int64), **past})
    for _ in range(steps):
        tok = int(outs[0][0, -1].argmax())
        tokens.append(tok)
        past = dict(zip(names, outs[1:]))
        total += 1
        feeds = {
            "inputs_embeds": table[[[tok]]].astype(np.float32),
            "attention_mask": np.ones((1, total), np.int64),
            **past,
        }
        t0 = time.perf_counter()
        outs = s.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return times, tokens


def _public(argv: list[str], local: tuple[str, ...] = ("--work", "--model")) -> list[str]:
    """The command's arguments without the options that name local folders (``local``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in local:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in local)):
            out.append(a)
    return out


def main() -> int:
    from prism_deploy.bench.machine import describe_machine, load_average
    from prism_deploy.models import quantize
    from prism_deploy.models.lm_export import export_model
    from prism_deploy.models.tokenizers import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="SmolLM2 HF folder (default: the real-model cache)")
    ap.add_argument("--work", default="quant-real-work", help="folder for the exports (reused when present)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", type=int, default=4, help="held-out windows of 256 tokens")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prepare-only", action="store_true", help="quantize the cases, measure nothing")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args()
    if args.model is None:
        from prism_deploy.models import real

        args.model = str(real.model_dir(real.SMOLLM2))
    started = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load_average": load_average()}
    work = Path(args.work)
    names = args.cases.split(",")
    if "fp32" not in names:
        names.insert(0, "fp32")
    exports = {}
    # fp32 is exported once; every other case quantizes its two graphs as export-model does
    # (calibration activations from the first graph, its plan shared with the KV graph)
    fp32 = work / "fp32"
    if not (fp32 / "model.json").exists():
        export_model(args.model, "last", fp32, validate=False, force=True)
    activations = None
    for name in names:
        precision, options = CASES[name]
        folder = work / name
        t0 = time.time()
        record_file = folder / "quantization.json"
        if options is not None and not record_file.exists():
            spec = quantize.make_spec(precision, **options)
            if spec.needs_calibration and activations is None:
                from prism_deploy.models import hf
                from prism_deploy.models.lm_export import _calibration_feeds

                feeds, _ = _calibration_feeds(args.model, hf.load_causal_lm(args.model), "last", None)
                activations = quantize.layer_inputs(fp32 / "last.onnx", feeds)
            folder.mkdir(parents=True, exist_ok=True)
            graphs, plan, plan_errors = {}, None, None
            for key, graph in (("graph", "last.onnx"), ("graph_with_past", "last_with_past.onnx")):
                graphs[key] = quantize.quantize_graph(
                    fp32 / graph,
                    folder / graph,
                    spec,
                    activations=activations if spec.needs_calibration else None,
                    plan=plan,
                    plan_errors=plan_errors,
                )
                if spec.mixed:
                    plan, plan_errors = quantize.plan_of(graphs[key])
            record_file.write_text(
                json.dumps(
                    {"quantization": {**spec.to_json(), "graphs": graphs}, "seconds": round(time.time() - t0, 1)}
                )
            )
        manifest = json.loads((fp32 / "model.json").read_text())
        if options is not None:
            manifest = {**manifest, **json.loads(record_file.read_text())}
        exports[name] = {"folder": folder, "manifest": manifest}
        print(f"{name}: ready ({time.time() - t0:.0f} s)", flush=True)
    if args.prepare_only:
        return 0
    dims = exports[names[0]]["manifest"]["dims"]
    table = np.load(fp32 / "embed_tokens.npy")
    windows = held_out_ids(load_tokenizer(args.model), args.windows)
    ref = logits_on(exports["fp32"]["folder"], table, windows, args.threads)
    ref_ppl = perplexity(ref, windows)
    results: dict[str, dict] = {}
    for name in names:
        got = ref if name == "fp32" else logits_on(exports[name]["folder"], table, windows, args.threads)
        agree = float(np.mean(np.concatenate([g.argmax(-1) == r.argmax(-1) for g, r in zip(got, ref)])))
        ppl = perplexity(got, windows)
        q = exports[name]["manifest"].get("quantization")
        plan = None
        if q:
            g = q["graphs"]["graph_with_past"]
            plan = {
                label: sum(1 for b in g["plan"].values() if b == bits)
                for label, bits in (("int4", 4), ("int8", 8), ("float", None))
            }
        results[name] = {
            "perplexity": round(ppl, 4),
            "ppl_ratio": round(ppl / ref_ppl, 4),
            "top1_agreement": round(agree, 4),
            "plan": plan,
            "quantize_s": exports[name]["manifest"].get("seconds"),
            "weights_bytes": q["graphs"]["graph_with_past"]["quantized_bytes"] if q else None,
            "options": CASES[name][1],
        }
        print(f"{name}: ppl {ppl:.3f} ({ppl / ref_ppl:.4f}x), top-1 {agree:.4f}, plan {plan}", flush=True)
    prompt = windows[0][:64]
    sessions = {n: session(exports[n]["folder"] / "last_with_past.onnx", args.threads) for n in names}
    step_times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.reps):  # interleaved: each repetition runs every case in turn
        for n in names:
            times, _ = decode_steps(
                exports[n]["folder"],
                table,
                prompt,
                args.steps,
                args.threads,
                dims["layers"],
                dims["kv_heads"],
                dims["head_dim"],
                sess=sessions[n],
            )
            step_times[n].append(statistics.median(times))
    fp32_ms = statistics.median(step_times["fp32"]) * 1e3
    for n in names:
        ms = statistics.median(step_times[n]) * 1e3
        results[n].update(
            decode_ms=round(ms, 3),
            decode_ms_min=round(min(step_times[n]) * 1e3, 3),
            decode_speedup=round(fp32_ms / ms, 3),
        )
        print(f"{n}: decode {ms:.2f} ms/token ({fp32_ms / ms:.2f}x fp32)", flush=True)
    for n, r in results.items():
        kind = "int8" if n.startswith("int8") else "int4" if n.startswith("int4") else None
        if kind:
            t = TARGETS[kind]
            r["targets"] = {
                k: {"target": v, "met": (r[k] <= v if k == "ppl_ratio" else r[k] >= v)}
                for k, v in t.items()
                for k in [{"ppl_ratio": "ppl_ratio", "top1": "top1_agreement", "decode_speedup": "decode_speedup"}[k]]
            }
    out = {
        "what": "SmolLM2-135M-Instruct, held-out real text (the default corpus's held-out part), ONNX Runtime CPU",
        "command": " ".join(["python", "benchmarks/quant_real.py", *_public(sys.argv[1:])]),
        "started": started,
        "finished": {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load_average": load_average()},
        "machine": {**describe_machine(), "argv": ["benchmarks/quant_real.py", *_public(sys.argv[1:])]},
        "threads": args.threads,
        "held_out_tokens": int(sum(len(w) for w in windows)),
        "fp32_perplexity": round(ref_ppl, 4),
        "decode": {"prompt": 64, "steps": args.steps, "reps": args.reps},
        "targets": TARGETS,
        "cases": results,
    }
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
