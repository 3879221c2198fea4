"""Model A -> adapter -> model B as one callable, and greedy generation in model B.

``Pipeline(model_a=DIR, adapter=..., model_b=DIR, target=...)`` takes the folders written by
``prism-deploy export-model`` (``--role upper`` for A, ``--role lower`` for B), or the folders
``prism-deploy build --model`` made of them (told apart by their ``manifest.json``; see
:class:`prism_deploy.runtime.model_folder.ModelFolder`), and anything
:func:`prism_deploy.runtime.adapters.adapter_runner` accepts for the adapter.

The adapter works per token, so model B sees a prefix of exactly as many positions as model A
read, under the same attention mask.

Hand-offs: every graph runs with ONNX Runtime I/O binding (``OnnxRunner.run_device``), outputs left as
``OrtValue``s on the session's device (``cpu`` or ``cuda``): model A's ``hidden`` goes to an
adapter runner that has ``run_device`` (the ONNX runner here) without leaving the device, its
output goes to model B the same way, and the KV cache stays on the device between decoding
steps. Only the last position's logits (for the greedy argmax) and the chosen tokens'
embeddings (a [batch, d_B] upload) cross to and from the host per step. An adapter runner with
only ``run(numpy)`` (built engines from another layer, the reference runner) takes a host
round-trip, counted in ``host_round_trips``. The CUDA side of this has not been run yet (no
GPU was available where it was written): CPU runs exercise the same code with device ``cpu``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.targets import target_provider
from prism_deploy.format.model_folder import past_names
from prism_deploy.runtime.adapters import adapter_runner
from prism_deploy.runtime.model_folder import ModelFolder
from prism_deploy.runtime.onnx_runner import host, shape_of


class UpperRunner:
    """Model A's exported (or built) graph: ``input_ids``, ``attention_mask`` -> ``hidden``."""

    def __init__(self, model_dir: str | os.PathLike[str], provider: str = "cpu") -> None:
        self.dir = Path(model_dir)
        self.folder = ModelFolder(model_dir, "upper")
        self.manifest = self.folder.manifest
        self.hidden_size = int(self.manifest["dims"]["hidden"])
        self.vocab = int(self.manifest["dims"]["vocab"])
        self.max_seq = int(self.manifest["max_seq"])
        self.graph = self.folder.runner("graph", provider)
        self.device = self.graph.device

    def run_device(self, input_ids: np.ndarray, attention_mask: Any) -> Any:
        """``hidden`` as an OrtValue on the device."""
        return self.graph.run_device({"input_ids": input_ids, "attention_mask": attention_mask}, ["hidden"])[0]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return host(self.run_device(input_ids, attention_mask))


class LowerRunner:
    """Model B's exported (or built) graphs: full-sequence logits, and the KV-cache graph for generation."""

    def __init__(self, model_dir: str | os.PathLike[str], provider: str = "cpu") -> None:
        self.dir = Path(model_dir)
        self.folder = ModelFolder(model_dir, "lower")
        self.manifest = self.folder.manifest
        dims = self.manifest["dims"]
        self.hidden_size, self.vocab, self.layers = int(dims["hidden"]), int(dims["vocab"]), int(dims["layers"])
        self.kv_heads, self.head_dim = int(dims["kv_heads"]), int(dims["head_dim"])
        self.max_seq = int(self.manifest["max_seq"])
        self.graph = self.folder.runner("graph", provider)
        self.device = self.graph.device
        self.dtype = self.graph.input_dtype("inputs_embeds")
        self._provider = provider
        self._past: Any = None
        self._embed: np.ndarray | None = None

    @property
    def past_graph(self) -> Any:
        if self._past is None:  # opened on first generate: plain calls never pay for it
            self._past = self.folder.runner("graph_with_past", self._provider)
        return self._past

    @property
    def embed_tokens(self) -> np.ndarray:
        if self._embed is None:
            self._embed = self.folder.table("embed_tokens")
        return self._embed

    def run(self, inputs_embeds: Any, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        return host(self.graph.run_device(feeds, ["logits"])[0])

    def empty_past(self, batch: int) -> dict[str, Any]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.dtype) for n in past_names(self.layers)}

    def step(self, inputs_embeds: Any, attention_mask: np.ndarray, past: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Last position's logits [batch, vocab] (on the host) and the cache grown by the new
        positions (OrtValues left on the device). The mask covers past + new tokens."""
        feeds = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, **past}
        outs = self.past_graph.run_device(feeds)
        return host(outs[0])[:, -1], dict(zip(past_names(self.layers), outs[1:]))


class Pipeline:
    """Tokens -> model A -> adapter -> model B logits, on ONNX Runtime (numpy in and out).

    ``timings`` holds the seconds each stage took in the last call (``model_a``, ``adapter``,
    ``model_b``; ``generate`` adds ``model_b_prefill`` and ``model_b_decode`` with ``steps``).
    """

    def __init__(self, model_a: str | os.PathLike[str], adapter: Any, model_b: str | os.PathLike[str],
                 target: str = "ort-cpu", *, adapter_precision: str | None = None) -> None:
        self.target = target
        self.provider, self.provider_reason = target_provider(target)
        self.upper = UpperRunner(model_a, self.provider)
        self.lower = LowerRunner(model_b, self.provider)
        self.adapter = adapter_runner(adapter, target, precision=adapter_precision)
        self.adapter_kind = str(getattr(self.adapter, "kind", type(self.adapter).__name__))
        for side, want, have in (("input", self.upper.hidden_size, getattr(self.adapter, "in_dim", None)),
                                 ("output", self.lower.hidden_size, getattr(self.adapter, "out_dim", None))):
            if have is not None and int(have) != want:
                model = "model A's hidden size" if side == "input" else "model B's embedding size"
                raise PrismInputError(f"adapter {side} width {have} does not match {model} {want}")
        self.max_seq = min(self.upper.max_seq, self.lower.max_seq)
        self.timings: dict[str, float] = {}
        self.host_round_trips = 0  # adapter calls that went through host memory (see _adapt)

    def describe(self) -> dict[str, Any]:
        return {"target": self.target, "provider": self.provider, "provider_reason": self.provider_reason,
                "adapter_runner": self.adapter_kind, "model_a": str(self.upper.dir), "model_b": str(self.lower.dir),
                "d_a": self.upper.hidden_size, "d_b": self.lower.hidden_size, "vocab_b": self.lower.vocab,
                "max_seq": self.max_seq, "adapter_on_device": hasattr(self.adapter, "run_device")
                and getattr(self.adapter, "device", None) == self.upper.device}

    def prepare_inputs(self, input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
        """Checked int64 ``input_ids`` and ``attention_mask`` [batch, seq] (a 1-D row becomes batch 1)."""
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise PrismInputError(f"input_ids: expected integer ids [batch, seq] with seq >= 1, got {ids.dtype} {list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.upper.vocab:
            raise PrismInputError(f"input_ids: ids must be in 0..{self.upper.vocab - 1} (model A's vocabulary)")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape:
            raise PrismInputError(f"attention_mask: shape {list(mask.shape)} differs from input_ids {list(ids.shape)}")
        return ids.astype(np.int64), mask.astype(np.int64)

    def adapted_prefix(self, input_ids: Any, attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(model B's inputs_embeds from the adapter, as float32 numpy; the attention mask)."""
        adapted, mask = self._adapted_prefix(input_ids, attention_mask)
        return np.asarray(host(adapted), dtype=np.float32), mask

    def _adapt(self, hidden: Any) -> Any:
        """The adapter on model A's output: on the device when the runner can take an OrtValue
        there (``run_device``), else through host memory as float32 numpy."""
        if hasattr(self.adapter, "run_device") and getattr(self.adapter, "device", None) == self.upper.device:
            return self.adapter.run_device(hidden)
        self.host_round_trips += 1
        return np.asarray(self.adapter.run(host(hidden).astype(np.float32, copy=False)))

    def _adapted_prefix(self, input_ids: Any, attention_mask: Any = None) -> tuple[Any, np.ndarray]:
        ids, mask = self.prepare_inputs(input_ids, attention_mask)
        if ids.shape[1] > self.max_seq:
            raise PrismInputError(f"input_ids: {ids.shape[1]} tokens, more than the exported max_seq {self.max_seq}")
        t0 = time.perf_counter()
        hidden = self.upper.run_device(ids, mask)
        t1 = time.perf_counter()
        adapted = self._adapt(hidden)
        t2 = time.perf_counter()
        shape = shape_of(adapted)
        if shape != (*ids.shape, self.lower.hidden_size):
            raise PrismInputError(f"adapter output has shape {list(shape)}, model B needs "
                                  f"{[*ids.shape, self.lower.hidden_size]}")
        self.timings = {"model_a": t1 - t0, "adapter": t2 - t1}
        return adapted, mask

    def __call__(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """Model B's logits [batch, seq, vocab_B] over the adapted prefix."""
        adapted, mask = self._adapted_prefix(input_ids, attention_mask)
        t0 = time.perf_counter()
        logits = self.lower.run(adapted, mask)
        self.timings["model_b"] = time.perf_counter() - t0
        return np.asarray(logits, dtype=np.float32)

    def generate(self, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 16,
                 eos_token_id: int | None = None) -> np.ndarray:
        """Greedy continuation in model B after the adapted prefix: new token ids [batch, <= max_new_tokens].

        Step 0 feeds the adapted embeddings as the prefix (an empty KV cache); each later step
        feeds model B's own embedding of the token it just chose. With ``eos_token_id``, a
        finished row keeps emitting it and the loop stops once every row has finished.
        """
        if max_new_tokens < 1:
            raise PrismInputError(f"max_new_tokens: {max_new_tokens} must be at least 1")
        adapted, mask = self._adapted_prefix(input_ids, attention_mask)
        if mask.shape[1] + max_new_tokens - 1 > self.lower.max_seq:
            raise PrismInputError(f"{mask.shape[1]} prefix tokens + {max_new_tokens} new ones exceed model B's "
                                  f"exported max_seq {self.lower.max_seq}")
        batch = mask.shape[0]
        _ = self.lower.past_graph, self.lower.embed_tokens  # opened outside the timed steps
        t0 = time.perf_counter()
        logits, past = self.lower.step(adapted, mask, self.lower.empty_past(batch))
        t1 = time.perf_counter()
        chosen = []
        finished = np.zeros(batch, dtype=bool)
        token = logits.argmax(-1)
        embed = self.lower.embed_tokens
        for step in range(max_new_tokens):
            if eos_token_id is not None:
                token = np.where(finished, eos_token_id, token)
                finished |= token == eos_token_id
            chosen.append(token)
            if step == max_new_tokens - 1 or finished.all():
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            logits, past = self.lower.step(np.asarray(embed[token])[:, None, :], mask, past)
            token = logits.argmax(-1)
        t2 = time.perf_counter()
        self.timings.update({"model_b_prefill": t1 - t0, "model_b_decode": t2 - t1, "steps": float(len(chosen))})
        return np.stack(chosen, axis=1).astype(np.int64)
