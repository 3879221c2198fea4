"""Graphs of models (docs/graphs.md): one model feeding several adapters, and fusions joining them.

A :class:`Graph` opens every stage of a graph file (:mod:`prism_deploy.format.graph_file`) as a
chain does (models by the role their place asks for, adapters by
:func:`~prism_deploy.runtime.adapters.adapter_runner`) and runs them in topological order, wave
by wave: the stages of one wave take only earlier waves' outputs, and run on threads at the same
time when ``concurrent`` (ONNX Runtime releases the GIL while a session runs). A model folder
that several stages name with one role and target (one last model behind two branches) is
opened once, its sessions shared. Hand-offs stay on
the device as in the chain (``run_device``), except into a fusion adapter: its inputs' hidden
states are concatenated on the host (one round trip, counted in ``host_round_trips``).

The output is the stage listed last: a last model (its logits) or a logit fusion (the weighted
sum of its last models' log-probabilities, ``sum_i w_i * log_softmax(logits_i)``). Greedy
generation picks from the output: every last model behind it keeps its own KV cache and is fed
its own embedding of the chosen token (a logit fusion's models share one tokenizer, checked when
the file is read).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core import defaults
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.targets import target_provider
from prism_deploy.format.graph_file import GraphNode, GraphSpec, levels, read_graph_file
from prism_deploy.runtime.adapters import adapter_runner
from prism_deploy.runtime.chain import Chain, _on_device, check_stage_files
from prism_deploy.runtime.decode import greedy_tokens
from prism_deploy.runtime.model_stage import ModelStage
from prism_deploy.runtime.onnx_runner import host, shape_of


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)


def fuse_logits(logits: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """The logit fusion: ``sum_i w_i * log_softmax(logits_i)`` (unnormalised log-probabilities
    of the joint distribution; its argmax is the greedy token)."""
    return sum(float(w) * log_softmax(x) for w, x in zip(weights, logits))  # type: ignore[return-value]


class Graph:
    """Token ids -> the graph's stages in topological order -> the output's logits.

    ``stages[i]``: the opened stage ``i`` (a ``ModelStage``, an adapter runner, or None for a
    logit fusion); ``timings``: seconds per stage in the last call, by name.
    """

    def __init__(
        self,
        spec: GraphSpec,
        target: str | None = None,
        *,
        threads: int | None = None,
        concurrent: bool = True,
        adapters: dict[int, Any] | None = None,
    ) -> None:
        """``adapters``: runner objects to use for some adapter stages instead of their files
        (by stage index; parity's reference, or a planted fault in a test)."""
        self.spec = spec
        self.target = target or spec.target or "ort-cpu"
        self.provider, self.provider_reason = target_provider(self.target)
        self.concurrent = concurrent
        self.names = [n.name for n in spec.nodes]
        self.waves = levels(spec)
        self.stages: list[Any] = []
        opened: dict[tuple[str, ...], Any] = {}  # a model folder several stages name is opened once
        for n in spec.nodes:
            key = (
                (str(n.stage.path.resolve()), spec.roles[n.index], n.stage.target or self.target)
                if n.kind == "model" and n.stage is not None
                else None
            )
            if key is not None and key in opened:
                self.stages.append(opened[key])
                continue
            self.stages.append(self._open(n, threads, (adapters or {}).get(n.index)))
            if key is not None:
                opened[key] = self.stages[-1]
        self._check_widths()
        self.max_seq = min(s.max_seq for s in self.models)
        self.timings: dict[str, float] = {}
        self.host_round_trips = 0

    @classmethod
    def from_file(cls, path: str | os.PathLike[str] | GraphSpec, target: str | None = None, **kwargs: Any) -> Graph:
        """A graph from a graph (or chain) file, or a ``build --graph`` folder; files checked as a
        chain's are (present, and hashing as any recorded sha256)."""
        spec = path if isinstance(path, GraphSpec) else read_graph_file(graph_path(path))
        chain = spec.as_chain()
        for n in spec.nodes:
            if n.stage is not None:
                check_stage_files(chain, n.stage)
        return cls(spec, target, **kwargs)

    def _open(self, n: GraphNode, threads: int | None, given: Any) -> Any:
        if n.kind == "fusion":
            return None
        assert n.stage is not None
        stage_target = n.stage.target or self.target
        try:
            if n.kind == "model":
                provider, _ = target_provider(stage_target)
                return ModelStage(n.stage.path, self.spec.roles[n.index], provider, n.name, threads=threads)
            return adapter_runner(
                given if given is not None else n.stage.path, stage_target, precision=n.stage.precision, threads=threads
            )
        except PrismInputError as exc:
            raise type(exc)(f"{self.spec.where()}: {n.label}: {exc}") from None

    # ---- structure --------------------------------------------------------------------------------
    @property
    def nodes(self) -> list[GraphNode]:
        return self.spec.nodes

    @property
    def models(self) -> list[ModelStage]:
        return [s for n, s in zip(self.nodes, self.stages) if n.kind == "model"]

    @property
    def adapters(self) -> list[Any]:
        return [s for n, s in zip(self.nodes, self.stages) if n.kind == "adapter"]

    @property
    def first(self) -> ModelStage:
        return self.stages[0]

    @property
    def heads(self) -> list[tuple[int, float]]:
        """The last models the output is made of, with their weights: the output model with 1,
        or a logit fusion's inputs with theirs."""
        out = self.spec.output
        return list(zip(out.inputs, out.weights)) if out.kind == "fusion" else [(out.index, 1.0)]

    @property
    def last(self) -> ModelStage:
        """The (first) last model behind the output: its ``manifest`` gives the end-of-text id."""
        return self.stages[self.heads[0][0]]

    @property
    def precision(self) -> str:
        from prism_deploy.core.precision import loosest

        return loosest([m.precision for m in self.models] + [defaults.runner_precision(a) for a in self.adapters])

    def _check_widths(self) -> None:
        for n, s in zip(self.nodes, self.stages):
            if n.kind != "adapter":
                continue
            widths = [self.stages[i].out_width for i in n.inputs]
            in_dim, out_dim = getattr(s, "in_dim", None), getattr(s, "out_dim", None)
            if in_dim is not None and int(in_dim) != sum(widths):
                raise PrismInputError(
                    f"{self.spec.where()}: {n.label}: edge {self.spec.edge(n)}: in_dim {in_dim} does "
                    f"not match the hidden width(s) {' + '.join(map(str, widths))}"
                )
            for j in self.spec.consumers(n.index):
                want = self.stages[j].in_width
                if out_dim is not None and want is not None and int(out_dim) != int(want):
                    raise PrismInputError(
                        f"{self.spec.where()}: {n.label}: edge {n.name} -> {self.names[j]}: out_dim "
                        f"{out_dim} does not match the embedding width {want}"
                    )
        vocabs = {self.stages[i].vocab for i, _ in self.heads}
        if len(vocabs) > 1:
            raise PrismInputError(
                f"{self.spec.where()}: {self.spec.output.label}: vocabularies {sorted(vocabs)} differ"
            )

    def describe(self) -> dict[str, Any]:
        stages = []
        for n, s in zip(self.nodes, self.stages):
            item: dict[str, Any] = {
                "name": n.name,
                "kind": n.kind,
                "index": n.index,
                "inputs": [self.names[i] for i in n.inputs],
            }
            if n.kind == "model":
                item.update(role=s.role, folder=str(s.dir), width=s.out_width, precision=s.precision)
            elif n.kind == "adapter":
                item.update(
                    runner=str(getattr(s, "kind", type(s).__name__)),
                    in_dim=getattr(s, "in_dim", None),
                    out_dim=getattr(s, "out_dim", None),
                    precision=getattr(s, "precision", None),
                )
            else:
                item.update(fusion="logits", weights=list(n.weights))
            stages.append(item)
        return {
            "target": self.target,
            "provider": self.provider,
            "provider_reason": self.provider_reason,
            "max_seq": self.max_seq,
            "waves": [[self.names[i] for i in w] for w in self.waves],
            "stages": stages,
        }

    # ---- running ----------------------------------------------------------------------------------
    def prepare_inputs(self, input_ids: Any, attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Checked int64 ``input_ids`` and ``attention_mask`` [batch, seq], as a chain checks them
        (against the source's vocabulary and the smallest max_seq)."""
        return Chain.prepare_inputs(self, input_ids, attention_mask)  # type: ignore[arg-type]

    def run_stage(self, i: int, inputs: list[Any], mask: np.ndarray) -> Any:
        """Stage ``i`` on its inputs' outputs (in its ``inputs`` order): ids for the source."""
        n, stage = self.nodes[i], self.stages[i]
        if n.kind == "model":
            return stage.run_device(_on_device(inputs[0], stage.device), mask)
        if n.kind == "fusion":
            return fuse_logits([host(v) for v in inputs], n.weights)
        if (
            len(inputs) == 1
            and hasattr(stage, "run_device")
            and getattr(stage, "device", None) == getattr(self.stages[n.inputs[0]], "device", None)
        ):
            value = stage.run_device(inputs[0])
        else:
            self.host_round_trips += 1
            x = np.concatenate([np.asarray(host(v), np.float32) for v in inputs], axis=-1)
            value = np.asarray(stage.run(x))
        return value

    def _run_waves(self, ids: np.ndarray, mask: np.ndarray, skip: Callable[[int], bool]) -> dict[int, Any]:
        values: dict[int, Any] = {}
        self.timings = {}

        def one(i: int) -> tuple[int, Any, float]:
            t0 = time.perf_counter()
            given = [ids] if i == 0 else [values[j] for j in self.nodes[i].inputs]
            out = self.run_stage(i, given, mask)
            n = self.nodes[i]
            if n.kind == "adapter":
                for j in self.spec.consumers(i):
                    want = (*ids.shape, self.stages[j].in_width)
                    if shape_of(out) != want:
                        raise PrismInputError(
                            f"{n.label}: output has shape {list(shape_of(out))}, "
                            f"{self.nodes[j].label} needs {list(want)}"
                        )
            return i, out, time.perf_counter() - t0

        pool = ThreadPoolExecutor(max_workers=max(len(w) for w in self.waves)) if self.concurrent else None
        try:
            for wave in self.waves:
                todo = [i for i in wave if not skip(i)]
                done = list(pool.map(one, todo)) if pool is not None and len(todo) > 1 else [one(i) for i in todo]
                for i, out, seconds in done:
                    values[i] = out
                    self.timings[self.names[i]] = seconds
        finally:
            if pool is not None:
                pool.shutdown()
        return values

    def stage_outputs(self, input_ids: Any, attention_mask: Any = None) -> tuple[list[np.ndarray], np.ndarray]:
        """Every stage's output (host float32), by stage index; and the mask."""
        ids, mask = self.prepare_inputs(input_ids, attention_mask)
        values = self._run_waves(ids, mask, lambda i: False)
        return [np.asarray(host(values[i]), np.float32) for i in range(len(self.nodes))], mask

    def __call__(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """The output's logits [batch, seq, vocab] (a logit fusion's: fused log-probabilities)."""
        ids, mask = self.prepare_inputs(input_ids, attention_mask)
        values = self._run_waves(ids, mask, lambda i: False)
        return np.asarray(host(values[self.spec.output.index]), np.float32)

    def generate(
        self, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 16, eos_token_id: int | None = None
    ) -> np.ndarray:
        """Greedy tokens from the output [batch, <= max_new_tokens]: the prefix goes through the
        graph once; each last model behind the output then decodes with its KV cache, and the
        token chosen from the (fused) distribution is fed back to every one of them."""
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise PrismInputError(f"max_new_tokens: {max_new_tokens!r} must be an integer >= 1")
        ids, mask = self.prepare_inputs(input_ids, attention_mask)
        heads = self.heads
        for i, _ in heads:
            if mask.shape[1] + max_new_tokens - 1 > self.stages[i].max_seq:
                raise PrismInputError(
                    f"{mask.shape[1]} prefix tokens + {max_new_tokens} new ones exceed "
                    f"{self.nodes[i].label}'s exported max_seq {self.stages[i].max_seq}"
                )
        head_ids = {i for i, _ in heads}
        # everything but the last models (and the fusion): their inputs are what decoding starts from
        values = self._run_waves(ids, mask, lambda i: i in head_ids or self.nodes[i].kind == "fusion")
        batch = mask.shape[0]
        t0 = time.perf_counter()
        pasts = {}
        step_logits = []
        for i, _ in heads:
            last = self.stages[i]
            embeds = values[self.nodes[i].inputs[0]]
            logits, pasts[i] = last.step(_on_device(embeds, last.device), mask, last.empty_past(batch))
            step_logits.append(logits)
        t1 = time.perf_counter()
        weights = [w for _, w in heads]

        def step(token: np.ndarray, mask: np.ndarray) -> np.ndarray:
            head_logits = []
            for i, _ in heads:
                last = self.stages[i]
                logits, pasts[i] = last.step(np.asarray(last.embed_tokens[token])[:, None, :], mask, pasts[i])
                head_logits.append(logits)
            return fuse_logits(head_logits, weights)  # every head fed the token, one distribution

        chosen = list(greedy_tokens(fuse_logits(step_logits, weights), mask, step, max_new_tokens, eos_token_id))
        t2 = time.perf_counter()
        name = self.spec.output.name
        self.timings.update({f"{name}_prefill": t1 - t0, f"{name}_decode": t2 - t1, "steps": float(len(chosen))})
        return np.stack(chosen, axis=1).astype(np.int64)


def graph_path(path: str | os.PathLike[str]) -> Path:
    """A graph file, or a ``build --graph`` output folder (its ``graph.json``)."""
    p = Path(path)
    return p / "graph.json" if p.is_dir() else p
