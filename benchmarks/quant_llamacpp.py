"""llama.cpp's own quantizations of SmolLM2-135M on the held-out text ``quant_real.py`` measures:
the peer issue 21's int4 target names ("no worse in perplexity ratio than llama.cpp's Q4_K_M").

    python benchmarks/quant_llamacpp.py --llama-cpp-src DIR [--model HF_DIR] [--work DIR]
        [--types Q8_0,Q4_K_M,Q4_0,Q4_1,Q4_0-pure] [--windows 2] [--threads 1] [--reps 3] [--steps 32]
        [--compare benchmarks/results/DATE-cpu-quant-real.json] -o benchmarks/results/DATE-cpu-quant-llamacpp.json

An optional peer, never a dependency: it needs ``llama-cpp-python`` (a source build, about
20 minutes on 2 cores; docs/real-models.md, "llama.cpp's Q4_K_M") and, to make the GGUF file,
llama.cpp's converter, which the package does not install: ``--llama-cpp-src`` is the sdist's
``vendor/llama.cpp`` (``convert_hf_to_gguf.py`` and its own ``gguf-py``; the converter imports
``sentencepiece`` even for a BPE tokenizer), or ``--gguf`` a float GGUF of the model made
elsewhere. Without ``llama_cpp`` it prints one ``skipped:`` line and exits 0.

Steps: the model's Hugging Face folder (default: the real-model cache, ``prism_deploy.models.real``)
-> an F32 GGUF (the converter) -> each type by ``llama_cpp.llama_model_quantize`` (llama.cpp's
own mixes: Q4_K_M keeps some tensors at Q6_K by rule; ``-pure`` puts every tensor at the type).
Then, for every type, on 1 thread:

- quality: the same token ids as ``quant_real.py`` (its ``held_out_ids``: the default corpus's
  held-out part, windows of 256), fed to llama.cpp as ids (``logits_all``), so tokenization cannot
  differ; perplexity, its ratio to llama.cpp's own F32, next-token top-1 agreement with that F32;
  and the float model through transformers on the same ids (the reference ``quant_real.py``'s
  ONNX fp32 equals to rel L2 1e-6), which checks the conversion;
- speed: a 64-token prompt then ``--steps`` greedy steps of one token, types interleaved in each
  repetition; the median step time.

``--compare`` reads a ``quant_real.py`` results file measured on the same windows and states, per
int4 case, whether its perplexity ratio is no worse than Q4_K_M's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_real import WINDOW, _public, held_out_ids, perplexity

from prism_deploy.bench.llamacpp import FTYPES, PURE, convert_hf_to_gguf, quantize

REFERENCE = "F32"
PEER = "Q4_K_M"
LOCAL = ("--work", "--model", "--llama-cpp-src", "--gguf")  # local paths, left out of the recorded command


def skip_reason() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp is not installed (pip install llama-cpp-python: a source build, docs/real-models.md)"
    return None


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the file holds (llama.cpp's per-tensor choices)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def load(path: Path, threads: int):
    from llama_cpp import Llama

    return Llama(
        model_path=str(path),
        n_ctx=WINDOW,
        n_batch=WINDOW,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        verbose=False,
    )


def logits_of(llm, window: np.ndarray) -> np.ndarray:
    llm.reset()
    llm.eval([int(t) for t in window])
    return np.array(llm.scores[: len(window)], dtype=np.float32)


def decode_steps(llm, prompt: np.ndarray, steps: int) -> list[float]:
    llm.reset()
    llm.eval([int(t) for t in prompt])
    times = []
    for _ in range(steps):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        t0 = time.perf_counter()
        llm.eval([tok])
        times.append(time.perf_counter() - t0)
    return times


def float_logits(model: str, windows: list[np.ndarray], threads: int) -> list[np.ndarray]:
    import torch

    from prism_deploy.models import hf

    torch.set_num_threads(threads)
    lm = hf.load_causal_lm(model, dtype=torch.float32)
    with torch.no_grad():
        return [lm(input_ids=torch.from_numpy(w[None])).logits[0].numpy() for w in windows]


def agreement(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    return float(np.mean(np.concatenate([g.argmax(-1) == r.argmax(-1) for g, r in zip(got, ref)])))


def compare(results_file: Path, peer_ratio: float, float_ppl: float) -> dict:
    """Each int4 case of a quant_real.py results file against Q4_K_M's perplexity ratio."""
    other = json.loads(results_file.read_text())
    verdicts = {
        name: {
            "ppl_ratio": c["ppl_ratio"],
            "top1_agreement": c["top1_agreement"],
            "no_worse_than_q4_k_m": c["ppl_ratio"] <= peer_ratio,
        }
        for name, c in other["cases"].items()
        if name.startswith("int4")
    }
    return {
        "file": str(results_file),
        "its_fp32_perplexity": other["fp32_perplexity"],
        "same_text": abs(other["fp32_perplexity"] - float_ppl) / float_ppl < 1e-3,
        "q4_k_m_ppl_ratio": peer_ratio,
        "int4_cases": verdicts,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="SmolLM2 HF folder (default: the real-model cache)")
    ap.add_argument("--llama-cpp-src", default=None, help="llama.cpp's source (the sdist's vendor/llama.cpp)")
    ap.add_argument("--gguf", default=None, help="an F32/F16 GGUF of the model instead of converting")
    ap.add_argument("--work", default="quant-llamacpp-work", help="folder for the GGUF files (reused when present)")
    ap.add_argument("--types", default="Q8_0,Q4_K_M,Q4_0,Q4_1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", type=int, default=2, help="held-out windows of 256 tokens")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--compare", default=None, help="a quant_real.py results file on the same windows")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    reason = skip_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0
    from prism_deploy.bench.machine import describe_machine, load_average
    from prism_deploy.models.tokenizers import load_tokenizer

    types = [t for t in args.types.split(",") if t]
    unknown = [t for t in types if t.removesuffix(PURE) not in FTYPES]
    if unknown:
        print(f"error: --types {','.join(unknown)}: not one of {', '.join(FTYPES)} (each may end in {PURE})")
        return 2
    if args.model is None:
        from prism_deploy.models import real

        args.model = str(real.model_dir(real.SMOLLM2))
    started = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load_average": load_average()}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = {REFERENCE: Path(args.gguf) if args.gguf else work / "model-f32.gguf"}
    if not files[REFERENCE].is_file():
        if not args.llama_cpp_src:
            print("error: no GGUF file: pass --llama-cpp-src (llama.cpp's converter) or --gguf")
            return 2
        t0 = time.time()
        try:
            convert_hf_to_gguf(Path(args.llama_cpp_src), Path(args.model), files[REFERENCE])
        except RuntimeError as exc:
            raise SystemExit(f"error: {exc}") from None
        print(f"{REFERENCE}: converted ({time.time() - t0:.0f} s)", flush=True)
    for t in types:
        files[t] = work / f"model-{t.lower()}.gguf"
        if not files[t].is_file():
            t0 = time.time()
            try:
                quantize(files[REFERENCE], files[t], t, args.threads)
            except RuntimeError as exc:
                raise SystemExit(f"error: {exc}") from None
            print(f"{t}: quantized ({time.time() - t0:.0f} s)", flush=True)
    names = [REFERENCE, *types]
    windows = held_out_ids(load_tokenizer(args.model), args.windows)
    float_ref = float_logits(args.model, windows, args.threads)
    float_ppl = perplexity(float_ref, windows)
    models = {n: load(files[n], args.threads) for n in names}
    logits = {n: [logits_of(models[n], w) for w in windows] for n in names}
    ref_ppl = perplexity(logits[REFERENCE], windows)
    cases: dict[str, dict] = {}
    for n in names:
        ppl = perplexity(logits[n], windows)
        cases[n] = {
            "perplexity": round(ppl, 4),
            "ppl_ratio": round(ppl / ref_ppl, 4),
            "ppl_ratio_to_float_model": round(ppl / float_ppl, 4),
            "top1_agreement": round(agreement(logits[n], logits[REFERENCE]), 4),
            "top1_agreement_with_float_model": round(agreement(logits[n], float_ref), 4),
            "file_bytes": files[n].stat().st_size,
            "tensor_types": tensor_types(files[n]),
        }
        print(f"{n}: ppl {ppl:.3f} ({ppl / ref_ppl:.4f}x F32), top-1 {cases[n]['top1_agreement']:.4f}", flush=True)
    prompt = windows[0][:64]
    step_times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.reps):  # interleaved: each repetition runs every type in turn
        for n in names:
            step_times[n].append(statistics.median(decode_steps(models[n], prompt, args.steps)))
    ref_ms = statistics.median(step_times[REFERENCE]) * 1e3
    for n in names:
        ms = statistics.median(step_times[n]) * 1e3
        cases[n].update(
            decode_ms=round(ms, 3),
            decode_ms_min=round(min(step_times[n]) * 1e3, 3),
            decode_speedup=round(ref_ms / ms, 3),
        )
        print(f"{n}: decode {ms:.2f} ms/token ({ref_ms / ms:.2f}x F32)", flush=True)
    import llama_cpp

    out = {
        "what": "SmolLM2-135M-Instruct through llama.cpp (llama-cpp-python) on the held-out token ids of "
        "quant_real.py, CPU",
        "command": " ".join(["python", "benchmarks/quant_llamacpp.py", *_public(sys.argv[1:], LOCAL)]),
        "started": started,
        "finished": {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load_average": load_average()},
        "machine": {**describe_machine(), "llama_cpp_python": llama_cpp.__version__},
        "threads": args.threads,
        "held_out_tokens": int(sum(len(w) for w in windows)),
        "float_model_perplexity": round(float_ppl, 4),
        "f32_perplexity": round(ref_ppl, 4),
        "f32_top1_agreement_with_float_model": cases[REFERENCE]["top1_agreement_with_float_model"],
        "decode": {"prompt": len(prompt), "steps": args.steps, "reps": args.reps},
        "cases": cases,
    }
    if args.compare and PEER in cases:
        if Path(args.compare).is_file():
            out["compare"] = compare(Path(args.compare), cases[PEER]["ppl_ratio"], float_ppl)
        else:
            print(f"note: --compare {args.compare}: no such file, nothing compared")
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
