"""Shared by the adaptation tests: two text domains, an adapter fitted on the first, recorded traffic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prism_deploy.cli.main import main
from prism_deploy.serving import record

MAX_SEQ = 32


def prose_and_code() -> tuple[list[str], list[str]]:
    """Two text domains from the standard library: the language reference's prose, and source code."""
    import inspect
    import json.decoder
    import json.encoder
    import pydoc_data.topics as topics

    prose = [
        line.strip()
        for key in sorted(topics.topics)
        for line in topics.topics[key].splitlines()
        if len(line.strip()) > 30
    ]
    code = [
        line.strip()
        for mod in (json.encoder, json.decoder)
        for line in inspect.getsource(mod).splitlines()
        if len(line.strip()) > 20
    ]
    rng = np.random.default_rng(0)
    return [prose[i] for i in rng.permutation(len(prose))[:80]], [code[i] for i in rng.permutation(len(code))[:64]]


def fitted_on_prose(root: Path, llama: Path, qwen2: Path) -> dict[str, Path]:
    """Pairs collected from prose (Llama 64 -> Qwen2 96), an 8-worker adapter fitted on them, its
    ort-cpu fp32 build (parity checked)."""
    from prism_deploy.fit import FitOptions, PairedData, fit_adapter, fit_config
    from prism_deploy.models.collect import collect_pairs, save_pairs

    prose, _ = prose_and_code()
    x, z, info = collect_pairs(llama, qwen2, prose, pool="tokens", max_seq=MAX_SEQ, progress=False)
    out = {"pairs": root / "pairs.safetensors", "adapter": root / "fitted.safetensors", "build": root / "build"}
    save_pairs(out["pairs"], x, z, info)
    data = PairedData(f"{out['pairs']}:X", f"{out['pairs']}:Z", holdout=0.1)
    adapter, _ = fit_adapter(fit_config(64, 96, workers=8, top_k=None), data, FitOptions(method="joint"))
    adapter.save(out["adapter"])
    assert (
        main(["build", str(out["adapter"]), "-o", str(out["build"]), "--target", "ort-cpu", "--precision", "fp32"]) == 0
    )
    return out


def record_texts(folder: Path, tokenizer_dir: Path, texts: list[str], per_request: int = 4) -> None:
    """Record ``texts`` as the served first model would (its tokenizer's ids, padded batches)."""
    from prism_deploy.models.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    rec = record.Recorder(record.RecordSettings(folder), "first", Path(tokenizer_dir).name, len(tok))
    for i in range(0, len(texts), per_request):
        enc = tok(texts[i : i + per_request], padding=True, truncation=True, max_length=MAX_SEQ, return_tensors="np")
        rec.offer(enc["input_ids"], enc["attention_mask"])
