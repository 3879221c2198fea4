"""The seeds' quantization-recovery case on a real model (issue 21, item 7b): SmolLM2-135M at
int4 as the FIRST model -> adapter -> SmolLM2-135M at fp32 as the LAST model. What does the
adapter recover? (docs/real-models.md, "Quantization recovery")

    python benchmarks/quant_recovery.py [--model HF_DIR] [--work DIR] [--texts 200] [--windows 8]
        [--ridge 1e-3] -o benchmarks/results/DATE-cpu-quant-recovery.json

Steps, with the project's commands where they do the step:

1. ``prism-deploy export-model MODEL --role first --precision int4`` (its validation on): the
   int4 graph token ids -> final hidden states (576 wide, after the final norm).
2. Pairs on the default corpus's calibration part (its first ``--texts`` paragraphs, each cut to
   ``--max-seq`` tokens): X = the int4 graph's hidden state of each token (ONNX Runtime CPU),
   Z = the fp32 model's input embedding of the same token (one tokenizer, so the alignment is the
   identity that ``collect --pool tokens`` would find). ``collect`` itself runs model A in
   float through transformers, so it cannot give the int4 model's states: this script does.
   The same pairs from the fp32 first model (transformers) give a control adapter.
3. ``prism-deploy fit --x pairs:X --z pairs:Z --grid 1 1 --ridge R`` (one dense tile: the
   ridge least-squares map 576 -> 576).
4. On held-out windows of the corpus (never used for pairs), the fp32 last model (transformers,
   float32, which the fp32 export matches to rel L2 1e-6) is fed:
   (a) the tokens' own embeddings: fp32 alone, the reference;
   (b) the int4 hidden states as they are (identity: the widths are equal);
   (c) the int4 hidden states through the fitted adapter;
   (d) control: the fp32 first model's hidden states through the control adapter;
   and, for scale, (e) the int4 model alone (its hidden states through the model's own LM head).
   Each against (a): next-token top-1 agreement and perplexity of the text
   (``prism_deploy.core.metrics.next_token_quality``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cli(*args: str, refusal_ok: bool = False) -> dict:
    """One prism-deploy command with --json, on this checkout's code (a check that fails, exit 1,
    comes back as ``{"refused": its error line}`` where ``refusal_ok``)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "prism_deploy", *args, "--json"], env=env, capture_output=True, text=True
    )
    if refusal_ok and done.returncode == 1:
        return {"refused": done.stderr.strip().splitlines()[-1], "_wall_s": round(time.perf_counter() - t0, 1)}
    if done.returncode != 0:
        raise SystemExit(f"prism-deploy {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout)
    out["_wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    import torch
    from safetensors.numpy import save_file

    from prism_deploy.core import corpus
    from prism_deploy.core.metrics import next_token_quality
    from prism_deploy.core.ort_session import make_session
    from prism_deploy.models import hf, real
    from prism_deploy.reference.module import ReferenceAdapterRunner

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="SmolLM2 Hugging Face folder (default: the real-model cache)")
    p.add_argument("--work", default="quant-recovery-work")
    p.add_argument("--texts", type=int, default=200, help="calibration paragraphs for the pairs")
    p.add_argument("--windows", type=int, default=8, help="held-out windows of --max-seq tokens")
    p.add_argument("--max-seq", type=int, default=128)
    p.add_argument("--ridge", type=float, default=1e-3)
    p.add_argument("--mixed", action="store_true", help="export-model --mixed (per-layer int4/int8/float)")
    p.add_argument("--load-note", default="", help="what else ran on the machine")
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args()
    model_dir = Path(a.model) if a.model else real.model_dir(real.SMOLLM2)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    commands: list[str] = []

    first_dir = work / ("smol-int4-first" + ("-mixed" if a.mixed else ""))
    export_args = [
        "export-model",
        str(model_dir),
        "--role",
        "first",
        "--precision",
        "int4",
        "-o",
        str(first_dir),
        "--max-seq",
        str(a.max_seq),
    ] + (["--mixed"] if a.mixed else [])
    commands.append("prism-deploy " + " ".join(export_args))
    refusal_file = work / (first_dir.name + ".refusal.txt")
    refusal = refusal_file.read_text().strip() if refusal_file.exists() else None
    if not (first_dir / "model.json").exists():
        export = cli(*export_args, refusal_ok=True)
        timings["export_int4_first_s"] = export["_wall_s"]
        refusal = export.get("refused")
        if refusal:
            refusal_file.write_text(refusal + "\n")
            # the validation refuses int4 SmolLM2 (docs/real-models.md): the same export without
            # that gate is what this measurement needs
            from prism_deploy.models import quantize
            from prism_deploy.models.lm_export import export_model

            commands.append("export_model(..., validate=False)  # the same graph, without the refusing gate")
            export_model(
                model_dir,
                "first",
                first_dir,
                precision="int4",
                max_seq=a.max_seq,
                validate=False,
                force=True,
                quantization=quantize.make_spec("int4", mixed=a.mixed),
            )
    manifest = json.loads((first_dir / "model.json").read_text())
    session = make_session(first_dir / manifest["files"]["graph"]["name"], "cpu")

    tokenizer = hf_tokenizer(model_dir)
    model = hf.load_causal_lm(model_dir)
    model.eval()
    table = hf.input_embedding_matrix(model)

    def int4_hidden(ids: np.ndarray) -> np.ndarray:
        ids = ids[None].astype(np.int64)
        return session.run(["hidden"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]

    def fp32_hidden(ids: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(ids[None].astype(np.int64))
        with torch.no_grad():
            return hf.final_hidden(model, t, torch.ones_like(t)).numpy()[0]

    def last_logits(embeds: np.ndarray) -> np.ndarray:
        e = torch.from_numpy(np.ascontiguousarray(embeds, dtype=np.float32))[None]
        with torch.no_grad():
            return model(inputs_embeds=e, attention_mask=torch.ones(e.shape[:2], dtype=torch.long)).logits[0].numpy()

    # 2. pairs on the calibration part
    t0 = time.perf_counter()
    texts = corpus.default().part("calibration")[: a.texts]
    xs, xs_fp, zs = [], [], []
    for text in texts:
        ids = np.asarray(tokenizer(text, truncation=True, max_length=a.max_seq)["input_ids"], dtype=np.int64)
        if ids.size < 2:
            continue
        xs.append(int4_hidden(ids))
        xs_fp.append(fp32_hidden(ids))
        zs.append(table[ids])
    pairs = work / "pairs.safetensors"
    X, X_fp, Z = (np.concatenate(v).astype(np.float32) for v in (xs, xs_fp, zs))
    save_file({"X": X, "X_fp32": X_fp, "Z": Z}, str(pairs))
    timings["pairs_s"] = round(time.perf_counter() - t0, 1)

    # 3. fit
    fits = {}
    for name, x in (("int4", "X"), ("fp32_control", "X_fp32")):
        fit_args = [
            "fit",
            "--x",
            f"{pairs}:{x}",
            "--z",
            f"{pairs}:Z",
            "-o",
            str(work / f"adapter-{name}.safetensors"),
            "--grid",
            "1",
            "1",
            "--ridge",
            str(a.ridge),
        ]
        commands.append("prism-deploy " + " ".join(fit_args))
        fits[name] = cli(*fit_args)
        timings[f"fit_{name}_s"] = fits[name]["_wall_s"]
    adapter = ReferenceAdapterRunner(work / "adapter-int4.safetensors")
    control = ReferenceAdapterRunner(work / "adapter-fp32_control.safetensors")

    # 4. held-out windows
    t0 = time.perf_counter()
    windows = [
        np.asarray(w, dtype=np.int64)
        for w in corpus.token_windows(tokenizer, corpus.default().text("held_out"), a.max_seq, a.windows)
    ]
    ref, cases = [], {k: [] for k in ("b_identity", "c_adapter", "d_control_fp32_adapter", "e_int4_alone")}
    head = model.get_output_embeddings().weight.detach().numpy()
    for ids in windows:
        h4 = int4_hidden(ids)
        ref.append(last_logits(table[ids]))
        cases["b_identity"].append(last_logits(h4))
        cases["c_adapter"].append(last_logits(adapter.run(h4)))
        cases["d_control_fp32_adapter"].append(last_logits(control.run(fp32_hidden(ids))))
        cases["e_int4_alone"].append(h4 @ head.T)
    timings["held_out_s"] = round(time.perf_counter() - t0, 1)
    quality = {"a_fp32_alone": next_token_quality(ref, ref, windows)}
    quality.update({k: next_token_quality(v, ref, windows) for k, v in cases.items()})

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "note": a.load_note,
        },
        "command": "python benchmarks/quant_recovery.py " + " ".join(sys.argv[1:]),
        "steps": commands,
        "model": real.SMOLLM2 if not a.model else str(model_dir.name),
        "corpus": corpus.default().describe(),
        "pairs": {"texts": len(xs), "rows": int(X.shape[0]), "max_seq": a.max_seq},
        "held_out": {"windows": len(windows), "window_tokens": a.max_seq},
        "export_int4_first_refused": refusal,
        "export_int4_first": {
            "precision": manifest["precision"],
            "quantization": {k: v for k, v in manifest["quantization"].items() if k != "graphs"},
        },
        "fit": {k: {kk: vv for kk, vv in v.items() if kk != "_wall_s"} for k, v in fits.items()},
        "quality_vs_fp32": quality,
        "timings_s": timings,
    }
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.output).with_suffix(".tmp")
    # the results name no path of this machine: MODEL is --model (or the real-model cache's folder), WORK is --work
    text = json.dumps(result, indent=2, default=str).replace(str(model_dir), "MODEL").replace(str(work), "WORK")
    tmp.write_text(text + "\n")
    tmp.replace(a.output)
    for k, v in quality.items():
        print(
            f"{k:26s} top-1 {v['agreement']:.3f}  perplexity {v['perplexity']:.3f}  ratio {v['perplexity_ratio']:.3f}"
        )


def hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


if __name__ == "__main__":
    main()
