"""The Python-backend models a graph adds to the chain's (:mod:`prism_deploy.serving.graph_repository`).

Loaded by ``triton_graph_model.py`` inside Triton's stub process; which model it is comes from
the config's ``prism_kind``:

- ``concat``: a fusion adapter's inputs ``hidden_0..k-1`` [b, s, w_k] -> ``hidden``
  [b, s, sum w_k], side by side in the graph's order (as ``Graph.run_stage`` concatenates);
- ``logit_fusion``: ``logits_0..k-1`` -> ``logits`` = ``sum_k w_k * log_softmax(logits_k)``
  (``fuse_logits`` of the in-process graph, so both compute the same numbers);
- ``graph_generate``: greedy decoding as ``Graph.generate``, by Business Logic Scripting: the
  prefix through the graph's stage models (the ensemble's steps but the last models and the
  fusion), then every last model behind the output decodes through its ``_decode`` model with
  its own cache, fed its own embedding of the token chosen from the fused distribution.

Anything else is a chain model (:class:`prism_deploy.serving.backend.TritonPythonModel`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.runtime.decode import greedy_tokens
from prism_deploy.serving import backend
from prism_deploy.serving.backend import GenerateModel, RequestError, _error_response, _input, _last_position, _pb


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        kind = params.get("prism_kind")
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        if kind == "concat":
            self.impl: Any = ConcatModel(params)
        elif kind == "logit_fusion":
            self.impl = LogitFusionModel(params)
        elif kind == "graph_generate":
            decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled"))
            self.impl = GraphGenerateModel(version_dir, params, decoupled)
        else:
            self.impl = backend.TritonPythonModel()
            self.impl.initialize(args)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        return self.impl.execute(requests)

    def finalize(self) -> None:
        self.impl = None


class _PerRequest:
    """A model answering each request on its own (a bad one gets its own error)."""

    output = ""

    def compute(self, request: Any) -> np.ndarray:
        raise NotImplementedError

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = _pb()
        responses = []
        for request in requests:
            try:
                out = self.compute(request)
                responses.append(
                    pb.InferenceResponse(output_tensors=[pb.Tensor(self.output, np.ascontiguousarray(out))])
                )
            except RequestError as exc:
                responses.append(_error_response(str(exc)))
            except Exception as exc:
                responses.append(_error_response(f"{self.output} failed: {exc}", invalid=False))
        return responses


class ConcatModel(_PerRequest):
    output = "hidden"

    def __init__(self, params: dict[str, str]) -> None:
        self.widths = [int(w) for w in json.loads(params["widths"])]

    def compute(self, request: Any) -> np.ndarray:
        parts = [_input(request, f"hidden_{k}") for k in range(len(self.widths))]
        shapes = {p.shape[:-1] for p in parts if p is not None}
        if len(shapes) != 1:
            raise RequestError(f"hidden_*: batch and sequence shapes differ ({sorted(map(list, shapes))})")
        return np.concatenate([np.asarray(p, np.float32) for p in parts if p is not None], axis=-1)


class LogitFusionModel(_PerRequest):
    output = "logits"

    def __init__(self, params: dict[str, str]) -> None:
        self.weights = [float(w) for w in json.loads(params["weights"])]

    def compute(self, request: Any) -> np.ndarray:
        from prism_deploy.runtime.graph import fuse_logits

        logits = [_input(request, f"logits_{k}") for k in range(len(self.weights))]
        if len({x.shape for x in logits if x is not None}) != 1:
            raise RequestError("logits_*: shapes differ")
        return np.asarray(fuse_logits([x for x in logits if x is not None], self.weights), np.float32)


class GraphGenerateModel(GenerateModel):
    """``GenerateModel``'s request checks and answering, over the graph's steps and heads."""

    def __init__(self, version_dir: Path, params: dict[str, str], decoupled: bool) -> None:
        self.steps = json.loads(params["steps"])  # ensemble steps: model_name, input_map, output_map
        self.heads = json.loads(params["heads"])
        for head in self.heads:
            head["embed"] = np.load(version_dir / head["embed_tokens"], mmap_mode="r")
        self.max_seq = int(params["max_seq"])
        self.max_batch = int(params["max_batch"])
        self.vocab_first = int(params["vocab_first"])
        self.default_eos = int(params["eos_token_id"]) if params.get("eos_token_id", "") not in ("", "none") else None
        self.max_new_limit = int(params.get("max_new_tokens_limit", "256"))
        self.decoupled = decoupled

    def _prefix_tensors(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        tensors = {"input_ids": ids, "attention_mask": mask}
        for step in self.steps:
            outputs = list(step["output_map"])
            got = self._bls(step["model_name"], {k: tensors[v] for k, v in step["input_map"].items()}, outputs)
            tensors.update({step["output_map"][k]: v for k, v in zip(outputs, got)})
        return tensors

    def _step(self, head: dict[str, Any], feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        outs = self._bls(head["decode_model"], feeds, ["logits", *head["present_outputs"]])
        return _last_position(outs[0]), dict(zip(head["past_inputs"], outs[1:]))

    def _tokens(self, request: Any) -> Any:
        from prism_deploy.runtime.graph import fuse_logits

        ids, mask, max_new, eos = self._read(request)
        tensors = self._prefix_tensors(ids, mask)
        weights = [float(h["weight"]) for h in self.heads]
        pasts, logits = [], []
        for head in self.heads:
            step_logits, past = self._step(head, {"inputs_embeds": tensors[head["embeds"]], "attention_mask": mask})
            logits.append(step_logits)
            pasts.append(past)

        def step(token: np.ndarray, mask: np.ndarray) -> np.ndarray:
            head_logits = []
            for k, head in enumerate(self.heads):
                embeds = np.asarray(head["embed"][token], dtype=np.float32)[:, None, :]
                step_logits, pasts[k] = self._step(head, {"inputs_embeds": embeds, "attention_mask": mask, **pasts[k]})
                head_logits.append(step_logits)
            return fuse_logits(head_logits, weights)  # every head fed the token, one distribution

        for token in greedy_tokens(fuse_logits(logits, weights), mask, step, max_new, eos):
            yield token.astype(np.int64)
