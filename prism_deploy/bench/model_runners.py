"""What ``bench --model`` times for each folder and for the source model: a folder's graph on ONNX
Runtime CPU (either graph form, the way the chain runs it) and the folder's source model in
transformers eager; both with the bench's thread count and the same ``generate`` call, so that
the bench (:mod:`prism_deploy.bench.models`) and its memory children
(:mod:`prism_deploy.bench.resident`) load and run them alike.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


def graph_bytes(path: str | os.PathLike[str]) -> dict[str, int]:
    """Bytes of a graph's initializers: ``per_token`` (read by every call: all but the tables
    that Gather / GatherBlockQuantized read, which give one row per token) and ``tables``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    other = {i for n in model.graph.node if n.op_type not in ("Gather", "GatherBlockQuantized") for i in n.input}
    out = {"per_token": 0, "tables": 0}
    for t in model.graph.initializer:
        n = _nbytes(t)
        out["tables" if t.name in gathered and t.name not in other else "per_token"] += n
    return out


def _nbytes(t: Any) -> int:
    import onnx

    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


class OrtModel:
    """One folder's graph on ONNX Runtime CPU with the benchmark's thread count."""

    def __init__(self, folder: Path, threads: int | None) -> None:
        from prism_deploy.runtime.model_stage import ModelFolder

        self.folder = ModelFolder(folder)
        self.role = self.folder.role
        self.manifest = self.folder.manifest
        from prism_deploy.format.model_folder import graph_form

        self.graph_form = graph_form(self.manifest)
        self.key = "graph_with_past" if self.role == "last" and self.graph_form == "portable" else "graph"
        runner = self.folder.runner(self.key, "cpu", threads=threads)
        self.session = runner.session
        self.ort_form: Any = None
        if self.graph_form == "ort":  # the fused graph on its shared, preallocated KV buffer
            from prism_deploy.runtime.ort_form import OrtFormGraph

            self.ort_form = OrtFormGraph(runner, self.role, self.manifest["dims"], int(self.manifest["max_seq"]))
        dims = self.manifest["dims"]
        self.layers, self.kv, self.hd = int(dims["layers"]), int(dims["kv_heads"]), int(dims["head_dim"])
        self.dtype = np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32
        path = self.folder.dir / self.manifest["files"][self.key]["name"]
        if self.folder.build is not None:  # the engine file the session opened
            from prism_deploy.runtime.engines import select_entry

            entry = select_entry(self.folder.build, self.folder.dir, target="ort-cpu", layout=self.key)
            path = self.folder.dir / entry["parts"][0]["file"]
        self.graph_path = path

    @functools.cached_property
    def bytes(self) -> dict[str, int]:
        """The graph's weight bytes, read when first asked for: parsing a graph whose weights are
        inline holds them (and the file's bytes) in memory, which `--memory`'s child, which never
        asks, would otherwise count as the case's own (model L's portable int8 folder: 2.7 GB
        against 1.6 GB for its session alone)."""
        return graph_bytes(self.graph_path)

    def describe(self) -> dict[str, Any]:
        q = self.manifest.get("quantization") or {}
        return {
            "path": str(self.folder.dir),
            "role": self.role,
            "precision": self.manifest.get("precision", "fp32"),
            "form": q.get("form"),
            "block_size": q.get("block_size"),
            "symmetric": q.get("symmetric"),
            "accuracy_level": q.get("accuracy_level"),
            "built": self.folder.built,
            "graph": self.key,
            "graph_form": self.graph_form,
            "weight_bytes_per_token": self.bytes["per_token"],
            "table_bytes": self.bytes["tables"],
            "source": self.manifest.get("source"),
        }

    def generate(self, first: np.ndarray, steps: list[np.ndarray]) -> tuple[float, list[float]]:
        """(prefill seconds, per-step decode seconds). ``first``: ids [1, P] (a first model) or
        embeddings [1, P, d] (middle, last); ``steps``: embeddings [1, 1, d] fed one by one (last only)."""
        from prism_deploy.format.model_folder import past_names

        if self.ort_form is not None:
            return self._generate_ort_form(first, steps)
        if self.role in ("first", "middle"):
            mask = np.ones(first.shape[:2], dtype=np.int64)
            feed = {"input_ids": first} if self.role == "first" else {"inputs_embeds": first.astype(self.dtype)}
            t0 = time.perf_counter_ns()
            self.session.run(["hidden"], {**feed, "attention_mask": mask})
            return (time.perf_counter_ns() - t0) * 1e-9, []
        names = past_names(self.layers)
        past = {n: np.zeros((1, self.kv, 0, self.hd), dtype=self.dtype) for n in names}
        length = int(first.shape[1])
        outputs = ["logits", *past_names(self.layers, "present")]
        t0 = time.perf_counter_ns()
        out = self.session.run(
            outputs,
            {"inputs_embeds": first.astype(self.dtype), "attention_mask": np.ones((1, length), dtype=np.int64), **past},
        )
        prefill = (time.perf_counter_ns() - t0) * 1e-9
        decode = []
        for emb in steps:
            past = dict(zip(names, out[1:]))
            length += 1
            mask = np.ones((1, length), dtype=np.int64)
            t0 = time.perf_counter_ns()
            out = self.session.run(outputs, {"inputs_embeds": emb.astype(self.dtype), "attention_mask": mask, **past})
            decode.append((time.perf_counter_ns() - t0) * 1e-9)
        return prefill, decode

    def _generate_ort_form(self, first: np.ndarray, steps: list[np.ndarray]) -> tuple[float, list[float]]:
        graph = self.ort_form
        x = first if self.role == "first" else first.astype(self.dtype)
        length = int(first.shape[1])
        if self.role in ("first", "middle"):
            t0 = time.perf_counter_ns()
            graph.run(x, np.ones((1, length), dtype=np.int64))
            return (time.perf_counter_ns() - t0) * 1e-9, []
        cache = graph.new_cache(1)  # allocated once per generation, outside the timed calls, as the chain does
        t0 = time.perf_counter_ns()
        graph.step(x, np.ones((1, length), dtype=np.int64), cache)
        prefill = (time.perf_counter_ns() - t0) * 1e-9
        decode = []
        for emb in steps:
            length += 1
            mask = np.ones((1, length), dtype=np.int64)
            t0 = time.perf_counter_ns()
            graph.step(emb.astype(self.dtype), mask, cache)
            decode.append((time.perf_counter_ns() - t0) * 1e-9)
        return prefill, decode


class EagerModel:
    """The folder's source model in transformers, float32, eager PyTorch, the same thread count."""

    def __init__(self, hf_dir: str, role: str) -> None:
        from prism_deploy.models import hf

        self.hf, self.role = hf, role
        self.model = hf.load_causal_lm(hf_dir, uses_head=role == "last")
        self.source = hf_dir

    def describe(self) -> dict[str, Any]:
        import torch
        import transformers

        return {
            "path": self.source,
            "role": self.role,
            "precision": "fp32",
            "backend": "transformers eager",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
        }

    def generate(self, first: np.ndarray, steps: list[np.ndarray]) -> tuple[float, list[float]]:
        import torch

        hf = self.hf
        with torch.no_grad():
            if self.role in ("first", "middle"):
                x = torch.from_numpy(first if self.role == "first" else first.astype(np.float32))
                mask = torch.ones(x.shape[:2], dtype=torch.int64)
                t0 = time.perf_counter_ns()
                if self.role == "first":
                    hf.final_hidden(self.model, x, mask)
                else:
                    hf.final_hidden(self.model, None, mask, inputs_embeds=x)
                return (time.perf_counter_ns() - t0) * 1e-9, []
            emb = torch.from_numpy(first.astype(np.float32))
            mask = torch.ones(emb.shape[:2], dtype=torch.int64)
            t0 = time.perf_counter_ns()
            _, cache = hf.causal_lm_forward(self.model, inputs_embeds=emb, attention_mask=mask, use_cache=True)
            prefill = (time.perf_counter_ns() - t0) * 1e-9
            decode = []
            for step in steps:
                mask = torch.ones((1, mask.shape[1] + 1), dtype=torch.int64)
                x = torch.from_numpy(step.astype(np.float32))
                t0 = time.perf_counter_ns()
                _, cache = hf.causal_lm_forward(
                    self.model, inputs_embeds=x, attention_mask=mask, cache=cache, use_cache=True
                )
                decode.append((time.perf_counter_ns() - t0) * 1e-9)
        return prefill, decode
