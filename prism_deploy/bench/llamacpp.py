"""llama.cpp (``llama_cpp``, from llama-cpp-python) as a peer of the model folders in ``bench --model``,
and the one home of llama.cpp's tools the benchmarks use: its converter and its quantizer.

prism-deploy writes no GGUF file: the user gives a float GGUF (F32, F16 or BF16) of the folders'
model (``--gguf``). It is checked against the folders before anything is timed (vocabulary,
hidden size, layer count from its metadata against model.json's dims; a quantized file is
refused too: llama.cpp's types are made from a float file). Each folder precision then runs at
the llama.cpp type that matches it (:data:`TYPE_FOR_PRECISION`): fp32 the file as given (the case
is named after the file's type, ``llama.cpp F16`` where it is F16), int8 Q8_0 and int4 Q4_0,
each made once into the bench's scratch folder by ``llama_model_quantize`` (llama.cpp's own
rules; it may keep a few tensors at other types).

It is timed as the GenAI peer: the prompt's token ids (the ids whose embedding rows the folders
get), ``eval`` of the prompt and the greedy pick of the first token are the prefill, each later
``eval`` of the token picked before and its pick a decode step; ``n_threads`` and
``n_threads_batch`` are the bench's thread count.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core.errors import PrismInputError

# llama.cpp's file types (enum llama_ftype) that llama_model_quantize makes; "-pure": every
# tensor at that type (llama.cpp's --pure), which it otherwise keeps at more bits for some tensors
FTYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q4_K_S": 14, "Q4_K_M": 15, "Q6_K": 18}
PURE = "-pure"
FLOAT_TYPES = ("F32", "F16", "BF16")
# the llama.cpp type each folder precision is timed against (None: the given float file as it is)
TYPE_FOR_PRECISION: dict[str, str | None] = {"fp32": None, "fp16": "F16", "int8": "Q8_0", "int4": "Q4_0"}


def convert_hf_to_gguf(src: Path, model: Path, out: Path, outtype: str = "f32") -> None:
    """The Hugging Face folder ``model`` as a float GGUF file, by llama.cpp's converter
    (``src``: llama.cpp's source, the llama-cpp-python sdist's ``vendor/llama.cpp``, run with its
    own ``gguf-py``). Raises ``RuntimeError`` with the converter's last line where it fails."""
    script = src / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise RuntimeError(f"{src}: no convert_hf_to_gguf.py (the llama-cpp-python sdist's vendor/llama.cpp)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(script), str(model), "--outtype", outtype, "--outfile", str(out)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not out.is_file():
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {tail[0][:300]}")


def quantize(source: Path, out: Path, name: str, threads: int) -> None:
    """``source`` (a float GGUF) at llama.cpp's type ``name`` (a key of :data:`FTYPES`, optionally
    ending in :data:`PURE`) into ``out``, by ``llama_cpp.llama_model_quantize``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    ftype = FTYPES[name.removesuffix(PURE)]
    params.ftype = ftype
    params.pure = name.endswith(PURE)
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"llama_model_quantize of {source} to {name} (ftype {ftype}) failed (rc {rc})")


def check_gguf(path: str | os.PathLike[str], dims: dict[str, Any]) -> dict[str, Any]:
    """The GGUF file's shape (:func:`prism_deploy.models.gguf.model_shape`) where it is a float
    file of the model whose model.json ``dims`` are given; else ``PrismInputError`` naming it."""
    from prism_deploy.models.gguf import model_shape

    shape = model_shape(path)
    if shape["weight_type"] not in FLOAT_TYPES:
        raise PrismInputError(
            f"{path}: its weights are {shape['weight_type']}, not a float type ({', '.join(FLOAT_TYPES)}): "
            "give a float GGUF, from which the bench makes llama.cpp's types"
        )
    pairs = (("vocab", "vocab"), ("hidden", "hidden"), ("layers", "layers"))
    differ = [f"{key} {shape[key]} (the folders' {dims.get(dim)})" for key, dim in pairs if shape[key] != dims.get(dim)]
    if differ:
        raise PrismInputError(f"{path}: not the folders' model: its {', '.join(differ)}")
    return shape


def gguf_for(precision: str, given: Path, given_type: str, scratch: Path, threads: int) -> tuple[str, Path]:
    """(llama.cpp type, file) timed against a folder of ``precision``: the given file, or one made
    from it in ``scratch`` (reused where a run before made it)."""
    wanted = TYPE_FOR_PRECISION[precision]
    if wanted is None or wanted == given_type:
        return given_type, given
    import hashlib

    stat = given.resolve().stat()  # a kept scratch folder (--peer-dir) reuses a file made from this one only
    digest = hashlib.sha256(f"{given.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = scratch / f"{given.stem}-{digest}-{wanted.lower()}.gguf"
    if not out.is_file():
        quantize(given, out, wanted, threads)
    return wanted, out


class LlamaCppPeer:
    """A GGUF file in llama.cpp (llama-cpp-python), CPU only, the bench's thread count."""

    def __init__(self, path: Path, gguf_type: str, precision: str, threads: int, max_length: int) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.path, self.gguf_type, self.precision = path, gguf_type, precision
        started = time.perf_counter()
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_gpu_layers=0,
            n_ctx=max_length + 1,
            n_batch=max_length + 1,  # the prompt in one batch, as the folders' prefill
            n_ubatch=max_length + 1,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.load_s = time.perf_counter() - started
        self.made_from: Path | None = None  # the given float file, where this one was quantized from it
        self.ids: np.ndarray | None = None  # the prompt's token ids [1, P], set by the bench
        self.tokens: list[int] = []  # the greedy tokens of the last generation

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "role": "last",
            "precision": self.precision,
            "backend": "llama.cpp",
            "gguf_type": self.gguf_type,
            "made_from": None if self.made_from is None else str(self.made_from),
            "llama_cpp_python": getattr(self.llama_cpp, "__version__", None),
            "load_seconds": round(self.load_s, 2),
            "graph_form": "llama.cpp (its own loop)",
        }

    def _pick(self) -> int:
        row = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).argmax())

    def generate(self, first: np.ndarray, steps: list[np.ndarray]) -> tuple[float, list[float]]:
        assert self.ids is not None
        llm = self.llm
        llm.reset()  # an empty KV cache: the next eval starts at position 0
        t0 = time.perf_counter_ns()
        llm.eval([int(t) for t in self.ids[0]])
        token = self._pick()
        prefill = (time.perf_counter_ns() - t0) * 1e-9
        tokens, decode = [token], []
        for _ in steps:
            t0 = time.perf_counter_ns()
            llm.eval([token])
            token = self._pick()
            decode.append((time.perf_counter_ns() - t0) * 1e-9)
            tokens.append(token)
        self.tokens = tokens
        return prefill, decode
