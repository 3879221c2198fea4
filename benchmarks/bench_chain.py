"""The issue-18 chain end to end: model A -> two-pipe adapter -> model B, prompt + greedy tokens.

    python benchmarks/bench_chain.py --a-hf build/bench-models/model-a --b-hf build/bench-models/model-b \\
        --chain fp32=A-fp32,B-fp32 --chain int8=A-int8,B-int8 --chain int4=A-int4,B-int4 \\
        [--prompt 64] [--new-tokens 32] [--repeat 3] [--threads 1] [--json FILE]

Each ``--chain NAME=A_DIR,B_DIR`` is a ``Pipeline`` (ONNX Runtime CPU) of two exported folders
with the same adapter; the adapter (512 -> 640, two pipes of an 8x8 grid, top 16 each, seeded)
is written to the output's folder as ``.safetensors`` and lowered at fp32 on first use. The
baseline is the same chain in eager PyTorch: transformers model A (float32), the adapter's
reference module, transformers model B decoding with its KV cache, the same thread count.
Every repetition runs each chain once, in turn (interleaved). Reported: the median seconds of
the whole call (prompt through model A, the adapter, model B's prefill and ``new_tokens``
greedy steps), its stage times, and the speed-up over eager. One prompt, batch 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def eager_chain(model_a, adapter, model_b, ids: np.ndarray, new_tokens: int) -> tuple[np.ndarray, dict[str, float]]:
    import torch

    from prism_deploy.models import hf

    with torch.no_grad():
        t0 = time.perf_counter()
        x = torch.from_numpy(ids)
        mask = torch.ones_like(x)
        hidden = hf.final_hidden(model_a, x, mask)
        t1 = time.perf_counter()
        prefix = adapter(hidden)
        t2 = time.perf_counter()
        logits, cache = hf.causal_lm_forward(model_b, inputs_embeds=prefix, attention_mask=mask, use_cache=True)
        token = logits[:, -1].argmax(-1)
        t3 = time.perf_counter()
        table = model_b.get_input_embeddings()
        chosen = [token]
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], dim=1)
            logits, cache = hf.causal_lm_forward(
                model_b, inputs_embeds=table(token)[:, None, :], attention_mask=mask, cache=cache, use_cache=True
            )
            token = logits[:, -1].argmax(-1)
            chosen.append(token)
        t4 = time.perf_counter()
    return torch.stack(chosen, 1).numpy(), {
        "model_a": t1 - t0,
        "adapter": t2 - t1,
        "model_b_prefill": t3 - t2,
        "model_b_decode": t4 - t3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a-hf", required=True)
    parser.add_argument("--b-hf", required=True)
    parser.add_argument("--chain", action="append", required=True, metavar="NAME=A_DIR,B_DIR")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter-dir", default="build/bench-models")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import torch

    from prism_deploy.bench.machine import describe_machine, load_average
    from prism_deploy.models import hf
    from prism_deploy.reference import load_adapter, random_adapter, simple_config
    from prism_deploy.runtime.chain import Pipeline

    torch.set_num_threads(args.threads)
    load_start = load_average()
    adapter_path = Path(args.adapter_dir) / "adapter-512-640-2pipe.safetensors"
    if not adapter_path.is_file():
        random_adapter(simple_config(512, 640, (8, 8), top_k=16, pipes=2), seed=18).save(adapter_path)
    chains = {}
    for spec in args.chain:
        name, dirs = spec.split("=", 1)
        a_dir, b_dir = dirs.split(",")
        # one thread count for every runner
        chains[name] = Pipeline(a_dir, adapter_path, b_dir, target="ort-cpu", threads=args.threads)
    model_a, model_b = hf.load_causal_lm(args.a_hf), hf.load_causal_lm(args.b_hf)
    adapter = load_adapter(adapter_path)
    ids = np.random.default_rng(args.seed).integers(0, 32000, size=(1, args.prompt), dtype=np.int64)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in [*chains, "eager"]}
    tokens: dict[str, list[int]] = {}
    for rep in range(args.repeat + 1):  # the first round warms up and is dropped
        for name, pipe in chains.items():
            t0 = time.perf_counter()
            out = pipe.generate(ids, max_new_tokens=args.new_tokens)
            total = time.perf_counter() - t0
            tokens[name] = out[0].tolist()
            if rep:
                runs[name].append({"total": total, **{k: v for k, v in pipe.timings.items() if k != "steps"}})
        t0 = time.perf_counter()
        out, stages = eager_chain(model_a, adapter, model_b, ids, args.new_tokens)
        total = time.perf_counter() - t0
        tokens["eager"] = out[0].tolist()
        if rep:
            runs["eager"].append({"total": total, **stages})
    eager_total = float(np.median([r["total"] for r in runs["eager"]]))
    results = {
        "kind": "chain-bench",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": vars(args),
        "adapter": str(adapter_path),
        "machine": {**describe_machine(), "load_average_start": load_start, "load_average_end": load_average()},
        "chains": {},
    }
    for name, samples in runs.items():
        med = {k: float(np.median([s[k] for s in samples])) for k in samples[0]}
        results["chains"][name] = {
            "median_s": med,
            "samples": samples,
            "speedup_vs_eager": eager_total / med["total"],
            "tokens_equal_eager": tokens[name] == tokens["eager"],
        }
        print(
            f"{name:>8}: {med['total'] * 1e3:8.1f} ms  ({', '.join(f'{k} {v * 1e3:.1f}' for k, v in med.items() if k != 'total')})"
            f"  {eager_total / med['total']:.2f}x eager; same tokens as eager: {tokens[name] == tokens['eager']}"
        )
    print(f"load average {load_start} -> {load_average()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
