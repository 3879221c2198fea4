"""Peers timed beside a last model's folders in ``bench --model``: ONNX Runtime GenAI and llama.cpp.

Each is optional; where it is not installed the results carry the reason it was skipped, never
a figure. A peer runs the folder's source model (the Hugging Face folder in model.json) whole,
from token ids, with its own generation loop, at the folders' precision, the same thread count,
prompt length and number of new tokens; it is timed as the folders are (prefill, then each
decode step), in the same interleaved repetitions.

- **ONNX Runtime GenAI**: its model builder writes the model into a scratch folder (a child
  process; the time is not counted), with ``intra_op_num_threads`` set in its
  ``genai_config.json``; ``Generator.append_tokens`` and the first ``generate_next_token`` (which
  only picks from the prefill's logits) are the prefill, each later ``generate_next_token`` a
  decode step (one model run on the token picked before, greedy), on its KV cache shared
  between past and present.
- **llama.cpp** (``llama_cpp``): on a float GGUF file of the model given with ``--gguf`` (this
  project writes none), at the type that matches each folder precision
  (:mod:`prism_deploy.bench.llamacpp`); without the file, or without ``llama_cpp``, it is listed
  with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GENAI_PRECISIONS = ("fp32", "int8", "int4")


def source_digest(hf_dir: str) -> str:
    """A short name for one source model (its resolved path and config), so that peer builds
    kept in a ``--peer-dir`` between runs are never reused for another model."""
    import hashlib

    path = Path(hf_dir).resolve()
    config = path / "config.json"
    text = config.read_bytes() if config.is_file() else b""
    return hashlib.sha256(str(path).encode() + b"\0" + text).hexdigest()[:12]


def peer_reasons(gguf: str | os.PathLike[str] | None = None) -> dict[str, str | None]:
    """Why each peer is skipped (None: it runs); llama.cpp runs on the GGUF file ``gguf``."""
    genai = (
        None
        if importlib.util.find_spec("onnxruntime_genai")
        else ("onnxruntime_genai is not installed (pip install --no-deps onnxruntime-genai==0.18.0)")
    )
    llama = (
        "llama_cpp is not installed (pip install llama-cpp-python)"
        if importlib.util.find_spec("llama_cpp") is None
        else None
        if gguf
        else "needs a float GGUF file of the model (--gguf FILE), which prism-deploy does not write"
    )
    return {"onnxruntime-genai": genai, "llama.cpp": llama}


class GenAIPeer:
    """The source model in ONNX Runtime GenAI, built by its model builder at ``precision``."""

    def __init__(self, hf_dir: str, precision: str, threads: int, max_length: int, scratch: Path) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.precision = precision
        self.source = hf_dir
        out = scratch / f"genai-{precision}-{source_digest(hf_dir)}"
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            hf_dir,
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            str(scratch / "cache"),
        ]
        config_path = out / "genai_config.json"
        started = time.perf_counter()
        if not config_path.is_file():  # a scratch folder kept between runs (several thread counts) is reused
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"the model builder failed: {tail[0][:300]}")
        self.build_s = time.perf_counter() - started
        config = json.loads(config_path.read_text())
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        config["search"]["max_length"] = max_length + 1  # the prompt, the prefill's token, one per step
        config_path.write_text(json.dumps(config, indent=2))
        self.model = og.Model(str(out))
        self.max_length = max_length
        self.ids: np.ndarray | None = None  # the prompt's token ids, set by the bench

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.source,
            "role": "last",
            "precision": self.precision,
            "backend": "onnxruntime-genai",
            "onnxruntime_genai": getattr(self.og, "__version__", None),
            "builder_seconds": round(self.build_s, 1),
            "graph_form": "ort (GenAI's own loop)",
        }

    def generate(self, first: np.ndarray, steps: list[np.ndarray]) -> tuple[float, list[float]]:
        og = self.og
        assert self.ids is not None
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length + 1, do_sample=False)
        generator = og.Generator(self.model, params)
        t0 = time.perf_counter_ns()
        generator.append_tokens(self.ids.astype(np.int32))  # the prefill, and the first token's logits
        # picks the first token from the prefill's logits (no model run: GenAI runs the model on a
        # chosen token in the next call), so each timed call below is one model step, as the folders'
        generator.generate_next_token()
        prefill = (time.perf_counter_ns() - t0) * 1e-9
        decode = []
        for _ in steps:
            t0 = time.perf_counter_ns()
            generator.generate_next_token()
            decode.append((time.perf_counter_ns() - t0) * 1e-9)
        return prefill, decode


def make_peers(
    source: str | None,
    precisions: list[str],
    *,
    threads: int,
    max_length: int,
    ids: np.ndarray,
    scratch: Path,
    dims: dict[str, Any],
    gguf: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """({case name: peer}, {peer: why it is skipped}) for a last model's folders at
    ``precisions``; each peer gets the prompt's token ids ``ids`` [1, P]. A GGUF file that is not
    a float file of the model (``dims``) raises ``PrismInputError`` before any peer is built."""
    peers: dict[str, Any] = {}
    skipped = {name: why for name, why in peer_reasons(gguf).items() if why}
    llama_cpp = None
    if "llama.cpp" not in skipped and gguf is not None:
        from prism_deploy.bench.llamacpp import check_gguf

        llama_cpp = check_gguf(gguf, dims)  # before anything is built: bad input, exit 2
    if "onnxruntime-genai" not in skipped:
        if not (source and (Path(source) / "config.json").is_file()):
            skipped["onnxruntime-genai"] = f"no Hugging Face folder at {source!r} (give --hf)"
        for precision in precisions:
            if precision not in GENAI_PRECISIONS or "onnxruntime-genai" in skipped:
                continue
            try:
                genai = GenAIPeer(str(source), precision, threads, max_length, scratch)
            except Exception as exc:  # the builder or GenAI's loader: the peer is skipped, with the reason
                skipped[f"onnxruntime-genai {precision}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            genai.ids = ids
            peers[f"onnxruntime-genai {precision}"] = genai
    if llama_cpp is not None and gguf is not None:
        from prism_deploy.bench.llamacpp import TYPE_FOR_PRECISION, LlamaCppPeer, gguf_for

        for precision in precisions:
            if precision not in TYPE_FOR_PRECISION:
                skipped[f"llama.cpp {precision}"] = f"no llama.cpp type is matched to {precision}"
                continue
            try:
                gguf_type, path = gguf_for(precision, Path(gguf), llama_cpp["weight_type"], scratch, threads)
                if f"llama.cpp {gguf_type}" in peers:  # fp32 and fp16 folders beside one F16 file: timed once
                    continue
                llama = LlamaCppPeer(path, gguf_type, precision, threads, max_length)
            except Exception as exc:  # llama.cpp's quantizer or loader: skipped, with the reason
                skipped[f"llama.cpp {precision}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            llama.ids = ids
            llama.made_from = None if path == Path(gguf) else Path(gguf)
            peers[f"llama.cpp {gguf_type}"] = llama
    return peers, skipped
