"""Chains of models: ``Model_1 -> adapter -> Model_2 -> adapter -> ... -> Model_N`` on ONNX Runtime.

Stages alternate models and adapters. A model is a folder from ``prism-deploy export-model`` or
``prism-deploy build --model`` (:class:`~prism_deploy.runtime.model_stage.ModelStage`), with the
role its place asks for: ``first`` (token ids -> hidden), ``middle`` (embeddings -> hidden),
``last`` (embeddings -> logits, and the KV-cache graph for generation). An adapter is anything
:func:`~prism_deploy.runtime.adapters.adapter_runner` accepts: a build folder, an exported
``.onnx``, an adapter ``.safetensors`` (lowered on first use), or an object with ``run``.

Before anything runs, the chain is checked: roles in order, each adapter's ``in_dim`` equal to
the width of the model before it and its ``out_dim`` to the embedding width of the model after
it, every file present (and, when the chain file records a ``sha256``, hashing as recorded). A
mismatch is one ``PrismInputError`` naming the stage.

Adapters work per token, so every model sees a prefix of exactly as many positions as the
first model read, under the same attention mask.

Hand-offs: every graph runs with ONNX Runtime I/O binding (``OnnxRunner.run_device``), outputs
left as ``OrtValue``s on the session's device (``cpu`` or ``cuda``): each stage's output goes to
the next stage without leaving the device when the next runner can take it there (models, and
adapters with ``run_device`` on the same device), and the last model's KV cache stays on the
device between decoding steps. Only the last position's logits (for the greedy argmax) and the
chosen tokens' embeddings cross to and from the host per step. An adapter runner with only
``run(numpy)`` (built engines, the reference) takes a host round trip, counted in
``host_round_trips``. The CUDA side has not run yet (no GPU was available where it was written):
CPU runs exercise the same code with device ``cpu``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.limits import mask_problem
from prism_deploy.core.precision import Precision
from prism_deploy.core.targets import target_provider
from prism_deploy.format.chain_file import ChainSpec, check_stage_files, read_chain_file
from prism_deploy.runtime.adapters import adapter_runner
from prism_deploy.runtime.decode import greedy_tokens
from prism_deploy.runtime.engines import AmbiguousEngines
from prism_deploy.runtime.model_stage import ModelStage
from prism_deploy.runtime.onnx_runner import host, shape_of


def _on_device(value: Any, device: str) -> Any:
    """``value`` where a runner on ``device`` can take it: an OrtValue on another device goes
    through the host."""
    if isinstance(value, np.ndarray) or not hasattr(value, "device_name"):
        return value
    return value if value.device_name().lower() == device else value.numpy()


class Chain:
    """Token ids -> model 1 -> adapter -> model 2 -> ... -> the last model's logits.

    ``timings`` holds the seconds each stage took in the last call, by stage name;
    ``generate`` adds ``<last>_prefill``, ``<last>_decode`` and ``steps``.
    """

    def __init__(
        self,
        stages: Sequence[Any],
        target: str = "ort-cpu",
        *,
        names: Sequence[str] | None = None,
        precisions: Sequence[Precision | str | None] | None = None,
        targets: Sequence[str | None] | None = None,
        spec: ChainSpec | None = None,
        threads: int | None = None,
        precision_keyword: str = "precisions=[...]",
    ) -> None:
        """``stages``: model folders and adapters, alternating, models first and last. ``names``,
        ``precisions`` (adapters) and ``targets`` (per stage, defaulting to ``target``) are optional;
        ``threads``: ONNX Runtime's intra-op threads for the models and ONNX adapters (its own
        default when None; a built engine opens its sessions as it was built)."""
        if len(stages) < 3 or len(stages) % 2 == 0:
            raise PrismInputError(f"a chain is model, adapter, model[, adapter, model ...]: got {len(stages)} stage(s)")
        n = len(stages)
        self.spec = spec
        self.target = target
        self.provider, self.provider_reason = target_provider(target)
        self.names = list(names) if names is not None else default_names(n)
        precisions = list(precisions) if precisions is not None else [None] * n
        stage_targets = [t or target for t in (targets if targets is not None else [None] * n)]
        self.models: list[ModelStage] = []
        self.adapters: list[Any] = []
        self.stages: list[Any] = []
        for i, stage in enumerate(stages):
            label = self._label(i)
            try:
                if i % 2 == 0:
                    role = "first" if i == 0 else "last" if i == n - 1 else "middle"
                    provider, _ = target_provider(stage_targets[i])
                    obj: Any = ModelStage(stage, role, provider, self.names[i], threads=threads)
                    self.models.append(obj)
                else:
                    obj = adapter_runner(stage, stage_targets[i], precision=precisions[i], threads=threads)
                    self.adapters.append(obj)
            except AmbiguousEngines as exc:  # said in this API's words
                raise exc.saying(
                    f"pick one with {precision_keyword} (one of {', '.join(sorted(_precisions(exc.ids)))})"
                ) from None
            except PrismInputError as exc:  # the same kind of error (an engine's stays an EngineFileError), labelled
                raise type(exc)(f"{label}: {exc}") from None
            self.stages.append(obj)
        self._check_widths()
        self.max_seq = min(m.max_seq for m in self.models)
        self.timings: dict[str, float] = {}
        self.host_round_trips = 0  # adapter calls that went through host memory

    @classmethod
    def from_file(cls, path: str | os.PathLike[str] | ChainSpec, target: str | None = None) -> Chain:
        """A chain from a chain file (``chain.toml`` / ``chain.json``, docs/pipeline.md)."""
        spec = path if isinstance(path, ChainSpec) else read_chain_file(path)
        for s in spec.stages:
            check_stage_files(spec, s)
        return cls(
            [s.path for s in spec.stages],
            target or spec.target or "ort-cpu",
            names=[s.name for s in spec.stages],
            precisions=[s.precision for s in spec.stages],
            targets=[s.target for s in spec.stages],
            spec=spec,
            precision_keyword=f'precision = "..." on that stage of {spec.path}',
        )

    # ---- structure --------------------------------------------------------------------------------
    @property
    def first(self) -> ModelStage:
        return self.models[0]

    @property
    def last(self) -> ModelStage:
        return self.models[-1]

    def _label(self, i: int) -> str:
        kind = "model" if i % 2 == 0 else "adapter"
        where = f"{self.spec.where()}: " if self.spec is not None else ""
        return f"{where}stage {i + 1} ({kind} {self.names[i]})"

    def _check_widths(self) -> None:
        for i in range(1, len(self.stages), 2):
            adapter, before, after = self.stages[i], self.stages[i - 1], self.stages[i + 1]
            for side, have, want, what in (
                (
                    "in_dim",
                    getattr(adapter, "in_dim", None),
                    before.out_width,
                    f"the hidden width {before.out_width} of stage {i} ({before.name})",
                ),
                (
                    "out_dim",
                    getattr(adapter, "out_dim", None),
                    after.in_width,
                    f"the embedding width {after.in_width} of stage {i + 2} ({after.name})",
                ),
            ):
                if have is not None and want is not None and int(have) != int(want):
                    raise PrismInputError(f"{self._label(i)}: {side} {have} does not match {what}")

    def adapter_kinds(self) -> list[str]:
        return [str(getattr(a, "kind", type(a).__name__)) for a in self.adapters]

    def describe(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "provider": self.provider,
            "provider_reason": self.provider_reason,
            "max_seq": self.max_seq,
            "stages": [
                {
                    "name": self.names[i],
                    "kind": "model" if i % 2 == 0 else "adapter",
                    **(
                        {"role": s.role, "folder": str(s.dir), "width": s.out_width, "precision": s.precision}
                        if i % 2 == 0
                        else {
                            "runner": str(getattr(s, "kind", type(s).__name__)),
                            "in_dim": getattr(s, "in_dim", None),
                            "out_dim": getattr(s, "out_dim", None),
                            "precision": getattr(s, "precision", None),
                            "on_device": self._adapter_on_device(i),
                        }
                    ),
                }
                for i, s in enumerate(self.stages)
            ],
        }

    # ---- running ----------------------------------------------------------------------------------
    def prepare_inputs(self, input_ids: Any, attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Checked int64 ``input_ids`` and ``attention_mask`` [batch, seq] (a 1-D row becomes batch 1)."""
        try:
            ids = np.asarray(input_ids)
        except (ValueError, TypeError):
            raise PrismInputError("input_ids: rows of token ids must all have the same length") from None
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise PrismInputError(
                f"input_ids: expected integer ids [batch, seq] with batch >= 1 and seq >= 1, "
                f"got {ids.dtype} {list(ids.shape)}"
            )
        vocab = self.first.vocab
        if ids.min() < 0 or ids.max() >= vocab:
            raise PrismInputError(f"input_ids: ids must be in 0..{vocab - 1} (the first model's vocabulary)")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape or not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
            raise PrismInputError(
                f"attention_mask: shape {list(mask.shape)} {mask.dtype} differs from input_ids "
                f"{list(ids.shape)} (integers 0/1 expected)"
            )
        problem = mask_problem(mask)
        if problem is not None:
            raise PrismInputError(problem)
        if ids.shape[1] > self.max_seq:
            raise PrismInputError(f"input_ids: {ids.shape[1]} tokens, more than the exported max_seq {self.max_seq}")
        return ids.astype(np.int64), mask.astype(np.int64)

    def _adapter_on_device(self, i: int) -> bool:
        adapter = self.stages[i]
        return hasattr(adapter, "run_device") and getattr(adapter, "device", None) == self.stages[i - 1].device

    def _adapt(self, i: int, hidden: Any) -> Any:
        """Adapter stage ``i`` on the previous model's output: on the device when the runner can
        take an OrtValue there (``run_device``), else through host memory as float32 numpy."""
        if self._adapter_on_device(i):
            return self.stages[i].run_device(hidden)
        self.host_round_trips += 1
        return np.asarray(self.stages[i].run(host(hidden).astype(np.float32, copy=False)))

    def _forward(self, ids: np.ndarray, mask: np.ndarray, *, upto: int | None = None) -> Any:
        """Run stages 0..upto-1 (all but the last model by default); returns the last output."""
        stop = len(self.stages) - 1 if upto is None else upto
        self.timings = {}
        value: Any = ids
        for i in range(stop):
            t0 = time.perf_counter()
            if i % 2 == 0:
                model = self.stages[i]
                value = model.run_device(_on_device(value, model.device), mask)
            else:
                value = self._adapt(i, value)
                want = (*ids.shape, self.stages[i + 1].in_width)
                if shape_of(value) != want:
                    raise PrismInputError(
                        f"{self._label(i)}: output has shape {list(shape_of(value))}, stage {i + 2} needs {list(want)}"
                    )
            self.timings[self.names[i]] = time.perf_counter() - t0
        return value

    def stage_outputs(self, input_ids: Any, attention_mask: Any = None) -> tuple[list[np.ndarray], np.ndarray]:
        """Every stage's output (host float32), the last model's logits last; and the mask."""
        ids, mask = self.prepare_inputs(input_ids, attention_mask)
        outputs = []
        value: Any = ids
        for i, stage in enumerate(self.stages):
            if i % 2 == 0:
                value = stage.run_device(_on_device(value, stage.device), mask)
            else:
                value = self._adapt(i, value)
            outputs.append(np.asarray(host(value), dtype=np.float32))
        return outputs, mask

    def adapted_prefix(self, input_ids: Any, attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(the last model's inputs_embeds, as float32 numpy; the attention mask)."""
        ids, mask = self.prepare_inputs(input_ids, attention_mask)
        return np.asarray(host(self._forward(ids, mask)), dtype=np.float32), mask

    def __call__(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """The last model's logits [batch, seq, vocab] over the prefix the chain hands it."""
        ids, mask = self.prepare_inputs(input_ids, attention_mask)
        embeds = self._forward(ids, mask)
        t0 = time.perf_counter()
        logits = self.last.run(_on_device(embeds, self.last.device), mask)
        self.timings[self.names[-1]] = time.perf_counter() - t0
        return np.asarray(logits, dtype=np.float32)

    def generate(
        self, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 16, eos_token_id: int | None = None
    ) -> np.ndarray:
        """Greedy continuation in the last model after the prefix: new token ids [batch, <= max_new_tokens].

        The prefix goes through the chain once; step 0 feeds the last model the handed-over
        embeddings (an empty KV cache); each later step feeds its own embedding of the token it
        just chose. With ``eos_token_id``, a finished row keeps emitting it and the loop stops
        once every row has finished.
        """
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise PrismInputError(f"max_new_tokens: {max_new_tokens!r} must be an integer >= 1")
        ids, mask = self.prepare_inputs(input_ids, attention_mask)
        last = self.last
        if mask.shape[1] + max_new_tokens - 1 > last.max_seq:
            raise PrismInputError(
                f"{mask.shape[1]} prefix tokens + {max_new_tokens} new ones exceed the last model's "
                f"exported max_seq {last.max_seq}"
            )
        embeds = self._forward(ids, mask)
        batch = mask.shape[0]
        _ = last.past_graph, last.embed_tokens  # opened outside the timed steps
        t0 = time.perf_counter()
        logits, past = last.step(_on_device(embeds, last.device), mask, last.empty_past(batch))
        t1 = time.perf_counter()
        table = last.embed_tokens

        def step(token: np.ndarray, mask: np.ndarray) -> np.ndarray:
            nonlocal past
            next_logits, past = last.step(np.asarray(table[token])[:, None, :], mask, past)
            return next_logits

        chosen = list(greedy_tokens(logits, mask, step, max_new_tokens, eos_token_id))
        t2 = time.perf_counter()
        name = self.names[-1]
        self.timings.update({f"{name}_prefill": t1 - t0, f"{name}_decode": t2 - t1, "steps": float(len(chosen))})
        return np.stack(chosen, axis=1).astype(np.int64)


class Pipeline(Chain):
    """The two-model chain: tokens -> model A -> adapter -> model B logits (stage names
    ``model_a``, ``adapter``, ``model_b``)."""

    def __init__(
        self,
        model_a: str | os.PathLike[str],
        adapter: Any,
        model_b: str | os.PathLike[str],
        target: str = "ort-cpu",
        *,
        adapter_precision: Precision | str | None = None,
        threads: int | None = None,
        precision_keyword: str = "adapter_precision=",
    ) -> None:
        # width refusals name the files given (set before the base class checks them)
        self._sources = [str(model_a), str(adapter) if isinstance(adapter, (str, os.PathLike)) else None, str(model_b)]
        super().__init__(
            [model_a, adapter, model_b],
            target,
            names=["model_a", "adapter", "model_b"],
            precisions=[None, adapter_precision, None],
            threads=threads,
            precision_keyword=precision_keyword,
        )

    def _check_widths(self) -> None:
        self._by_file = True  # a width refusal is about the files given: name them (a load error already does)
        try:
            super()._check_widths()
        finally:
            self._by_file = False

    def _label(self, i: int) -> str:
        source = self._sources[i]
        if getattr(self, "_by_file", False) and source is not None:
            return f"{source} ({self.names[i]})"
        return super()._label(i)

    @property
    def adapter(self) -> Any:
        return self.adapters[0]

    @property
    def adapter_kind(self) -> str:
        return self.adapter_kinds()[0]

    def describe(self) -> dict[str, Any]:
        """The chain's description, and the two-model names it had before chains."""
        a, b = self.models
        return {
            **super().describe(),
            "adapter_runner": self.adapter_kind,
            "model_a": str(a.dir),
            "model_b": str(b.dir),
            "d_a": a.hidden_size,
            "d_b": b.hidden_size,
            "vocab_b": b.vocab,
            "adapter_on_device": self._adapter_on_device(1),
        }


def _precisions(ids: list[str]) -> set[str]:
    """The precisions named in engine ids (``target/precision/layout/...``)."""
    return {i.split("/")[1] for i in ids if i.count("/") >= 2}


def default_names(n: int) -> list[str]:
    """``model_1``, ``adapter_1_2``, ``model_2``, ... for a chain of ``n`` stages."""
    return [f"model_{i // 2 + 1}" if i % 2 == 0 else f"adapter_{i // 2 + 1}_{i // 2 + 2}" for i in range(n)]


def chain_path(path: str | os.PathLike[str]) -> Path:
    """A chain file, or a ``build --chain`` output folder (its ``chain.json``)."""
    p = Path(path)
    return p / "chain.json" if p.is_dir() else p
