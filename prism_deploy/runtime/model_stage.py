"""A model on disk: the folder ``export-model`` wrote, or the one ``build --model`` wrote, and the
model as a stage of a chain.

Both folders hold ``model.json`` (role, dims, max_seq, the embedding table's name); a build
folder also has ``manifest.json`` (that is how it is told apart) whose entries name one engine
per graph and target. Engines and copied files are checked against the manifest's sha256 and
the engine's ONNX Runtime version before they are opened, as adapter engines are
(:mod:`prism_deploy.runtime.engines`); every file name stays inside the folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core.precision import ModelPrecision
from prism_deploy.format import model_folder
from prism_deploy.format.engine_manifest import EngineFileError, read_manifest, source_kind, verify_part
from prism_deploy.runtime.engines import select_entry
from prism_deploy.runtime.onnx_runner import OnnxRunner, host, shape_of
from prism_deploy.target_backends import graph_backend

POSITIONS = ("last", "all")  # which positions' logits ModelStage.step gives


class ModelFolder:
    """``model.json`` and one :class:`OnnxRunner` per graph (``graph``, ``graph_with_past``)."""

    def __init__(self, directory: str | os.PathLike[str], role: str | None = None) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise EngineFileError(f"{self.dir}: not a folder (a model folder from `export-model` or `build --model`)")
        self.build = read_manifest(self.dir)  # None for an export folder
        want = None if role is None else model_folder.canonical_role(role, "role")
        if self.build is not None:
            if source_kind(self.build) != "model":
                raise EngineFileError(
                    f"{self.dir}: holds adapter engines, not a model build" + (f" (role {want} needed)" if want else "")
                )
            built_role = model_folder.ROLE_ALIASES.get(self.build["model"].get("role"), self.build["model"].get("role"))
            if want is not None and built_role != want:
                raise EngineFileError(f"{self.dir}: a build of role {built_role!r}, {want!r} is needed here")
            for copy in self.build["model"].get("copies", []):  # model.json and the embedding table
                verify_part(self.dir, copy)
        self.manifest = model_folder.read_model_json(self.dir, want)
        self.role = str(self.manifest["role"])

    @property
    def built(self) -> bool:
        return self.build is not None

    def runner(self, key: str, provider: str, *, threads: int | None = None) -> OnnxRunner:
        """Graph ``key`` on ``provider``: the export's ``.onnx``, or the build's engine for
        ``ort-<provider>`` (opened as it was built). ``threads``: ONNX Runtime's intra-op
        threads (its own default when None; benchmarks set it)."""
        if self.build is None:
            return OnnxRunner.open(model_folder.file_path(self.dir, self.manifest, key), provider, threads=threads)
        backend = graph_backend(provider)
        entry = select_entry(self.build, self.dir, target=backend.target.value, layout=key)
        backend.check_environment(entry)
        path = verify_part(self.dir, entry["parts"][0])
        runner: OnnxRunner = backend.open_graph(path, entry, OnnxRunner.open, threads=threads)
        return runner

    def table(self, key: str) -> np.ndarray:
        """A table model.json lists (the embedding matrix), memory-mapped."""
        return np.load(model_folder.file_path(self.dir, self.manifest, key), mmap_mode="r", allow_pickle=False)


class ModelStage:
    """One model of a chain, by role: ``first`` (token ids -> hidden), ``middle`` (embeddings ->
    hidden) or ``last`` (embeddings -> logits, and the KV-cache graph for generation)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        role: str | None = None,
        provider: str = "cpu",
        name: str = "model",
        *,
        threads: int | None = None,
    ) -> None:
        self.folder = ModelFolder(directory, role)
        self.dir = self.folder.dir
        self.name = name
        self.manifest = self.folder.manifest
        self.role = self.folder.role
        dims = self.manifest["dims"]
        self.hidden_size, self.vocab, self.layers = int(dims["hidden"]), int(dims["vocab"]), int(dims["layers"])
        self.kv_heads, self.head_dim = int(dims["kv_heads"]), int(dims["head_dim"])
        self.max_seq = int(self.manifest["max_seq"])
        self.precision = ModelPrecision(self.manifest["precision"])  # model.json's schema requires one of them
        self.input_name = model_folder.INPUT[self.role]
        self.output_name = model_folder.OUTPUT[self.role]
        self._provider = provider
        self._threads = threads
        self.graph_form = model_folder.graph_form(self.manifest)
        self.graph: Any
        if self.graph_form == "ort":  # one fused graph per role on a shared, preallocated KV buffer
            from prism_deploy.runtime.ort_form import OrtFormGraph

            self.output_name = model_folder.OUTPUT_ORT_FORM[self.role]
            self.shares_past_graph = self.role == "last"
            self.graph = OrtFormGraph(
                self.folder.runner("graph", provider, threads=threads), self.role, dims, self.max_seq
            )
        else:
            # One set of weights in memory: a last model runs its KV-cache graph for plain calls too
            # (a past of length zero), instead of opening ``graph`` beside it with a second copy of
            # every weight (docs/model-forms.md has the resident memory before and after).
            self.shares_past_graph = self.role == "last" and "graph_with_past" in self.manifest["files"]
            self.graph = self.folder.runner(
                "graph_with_past" if self.shares_past_graph else "graph", provider, threads=threads
            )
        self.device = self.graph.device
        self.dtype = self.graph.input_dtype(self.input_name)  # None for token ids
        self._past: Any = self.graph if self.shares_past_graph else None
        self._embed: np.ndarray | None = None

    @property
    def in_width(self) -> int | None:
        """The width of the embeddings it takes (None for a first model, which takes ids)."""
        return None if self.role == "first" else self.hidden_size

    @property
    def out_width(self) -> int:
        """The width of what it gives: hidden states, or logits over its vocabulary."""
        return self.vocab if self.role == "last" else self.hidden_size

    def run_device(self, inputs: Any, attention_mask: Any) -> Any:
        """The output as an OrtValue on the device (a host array for the ort form)."""
        if self.graph_form == "ort":
            return self.graph.run(inputs, attention_mask)
        feeds = {self.input_name: inputs, "attention_mask": attention_mask}
        if self.shares_past_graph:
            feeds.update(self.empty_past(int(shape_of(inputs)[0])))
        return self.graph.run_device(feeds, [self.output_name])[0]

    def run(self, inputs: Any, attention_mask: Any) -> np.ndarray:
        return host(self.run_device(inputs, attention_mask))

    # ---- a last model's decoding ---------------------------------------------------------------
    @property
    def past_graph(self) -> OnnxRunner:
        if self.role != "last":
            raise EngineFileError(f"{self.dir}: a {self.role} model has no KV-cache graph")
        if self._past is None:  # opened on first generate: plain calls never pay for it
            self._past = self.folder.runner("graph_with_past", self._provider, threads=self._threads)
        return self._past

    @property
    def embed_tokens(self) -> np.ndarray:
        if self._embed is None:
            self._embed = self.folder.table("embed_tokens")
        return self._embed

    def empty_past(self, batch: int) -> Any:
        """An empty KV cache: zero-length arrays (portable form) or the ort form's buffers
        preallocated to max_seq, updated in place by each step."""
        if self.graph_form == "ort":
            return self.graph.new_cache(batch)
        dtype = self.dtype or np.float32
        return {
            n: np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=dtype)
            for n in model_folder.past_names(self.layers)
        }

    def step(
        self, inputs_embeds: Any, attention_mask: np.ndarray, past: Any, *, positions: str = "last"
    ) -> tuple[np.ndarray, Any]:
        """Logits on the host and the cache grown by the new positions (OrtValues left on the
        device; the ort form's cache, written in place). The mask covers past + new tokens.
        ``positions``: ``"last"`` gives the last position's logits [batch, vocab], all greedy
        decoding reads; ``"all"`` every new position's [batch, new, vocab] (portable form)."""
        if positions not in POSITIONS:
            raise ValueError(f"positions: {positions!r} is not one of {', '.join(POSITIONS)}")
        if self.graph_form == "ort":
            if positions != "last":
                raise EngineFileError(f"{self.dir}: the ort form's KV-cache step gives the last position only")
            return self.graph.step(inputs_embeds, attention_mask, past), past
        feeds = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, **past}
        if positions == "last" and model_folder.LOGITS_START in self.past_graph.optional_inputs:
            # the LM head on the last position only (docs/model-forms.md, "Prefill logits")
            feeds[model_folder.LOGITS_START] = np.array([-1], dtype=np.int64)
        outs = self.past_graph.run_device(feeds)
        logits = host(outs[0])
        return (logits[:, -1] if positions == "last" else logits), dict(
            zip(model_folder.past_names(self.layers), outs[1:])
        )
