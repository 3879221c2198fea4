"""The Python-backend models Triton runs: chain stages, the last model's decoding step, ``generate``.

Loaded by the ``model.py`` of every served version (:mod:`prism_deploy.serving.triton_model`)
inside Triton's stub process, where ``triton_python_backend_utils`` exists; it runs the stages
only through :mod:`prism_deploy.serving.stage_runtime`. Which model it is comes from the
config's ``parameters`` (``prism_kind``: a stage kind, ``decode`` or ``generate``).

- **Stages** (``max_batch_size`` > 0, dynamic batching): Triton hands ``execute`` the requests
  the batcher gathered. The adapter works per token, so every valid request's tokens are run as
  one call and split back; a model stage runs requests of equal sequence length as one batch.
  A bad request (a width, a length over the profile, an id outside the vocabulary) gets its own
  error response; the others in the batch are answered.
- **decode** (the last model's KV-cache graph, no batching): ``inputs_embeds``,
  ``attention_mask`` over past + new positions and, optionally, the past cache (absent: an
  empty one) -> the last position's ``logits`` [b, vocab] and the grown cache.
- **generate** (Business Logic Scripting): the prefix through the stage models, then greedy
  decoding through the decode model, by the in-process chain's own loop
  (:func:`prism_deploy.runtime.decode.greedy_tokens`); over an ``ort``-form last model, which
  has no decode model, the prefill and steps run here on the runtime's shared KV buffer. With
  ``model_transaction_policy
  { decoupled: true }`` it streams one response per step (``tokens`` [b, 1]) and ends with an
  empty final one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core.limits import mask_problem
from prism_deploy.format.stage_io import input_names, output_name, past_names
from prism_deploy.runtime.decode import greedy_tokens
from prism_deploy.runtime.onnx_runner import host
from prism_deploy.serving import stage_runtime


class RequestError(ValueError):
    """A request the model refuses (answered with INVALID_ARG; the server keeps serving)."""


def _pb() -> Any:
    import triton_python_backend_utils as pb_utils  # exists only inside Triton's stub process

    return pb_utils


def numpy_ok(version: str) -> bool:
    return int(version.split(".")[0]) < 2


class TritonPythonModel:
    """The class Triton's Python backend instantiates; dispatches on ``parameters.prism_kind``."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        if params.get("numpy_check", "below-2") != "off" and not numpy_ok(np.__version__):
            raise RuntimeError(
                f"numpy {np.__version__} in the Python backend environment: Triton's bundled Python "
                "backend needs numpy < 2 (it serves empty outputs with numpy 2); see docs/serving.md"
            )
        kind = params["prism_kind"]
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        self.name = config["name"]
        if kind in stage_runtime.KINDS:
            self.impl: Any = StageModel(kind, version_dir, params, config)
        elif kind == "decode":
            self.impl = DecodeModel(version_dir, params)
        elif kind == "generate":
            decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled"))
            self.impl = GenerateModel(version_dir, params, decoupled)
        else:
            raise RuntimeError(f"{self.name}: unknown prism_kind {kind!r}")

    def execute(self, requests: list[Any]) -> list[Any] | None:
        return self.impl.execute(requests)

    def finalize(self) -> None:
        self.impl = None


def _error_response(message: str, invalid: bool = True) -> Any:
    pb = _pb()
    code = pb.TritonError.INVALID_ARG if invalid else pb.TritonError.INTERNAL
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message, code))


def _input(request: Any, name: str, *, required: bool = True) -> np.ndarray | None:
    tensor = _pb().get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise RequestError(f"input {name!r} is missing")
        return None
    values = tensor.as_numpy()
    if name == "attention_mask":  # the same refusal as the in-process runtime's (core.limits)
        problem = mask_problem(values)
        if problem:
            raise RequestError(problem)
    return values


class StageModel:
    """One chain stage under dynamic batching (see the module docstring)."""

    def __init__(self, kind: str, version_dir: Path, params: dict[str, str], config: dict[str, Any]) -> None:
        self.kind = kind
        self.stage: Any = stage_runtime.open_stage(
            version_dir / stage_runtime.STAGE_DIR, kind, params.get("prism_provider", "cpu")
        )
        self.max_seq = int(params["max_seq"])
        inputs = {i["name"]: i for i in config["input"]}
        self.width = int(inputs[input_names(kind)[0]]["dims"][-1]) if kind != "first" else None
        self.vocab = int(getattr(self.stage, "vocab", 0)) if kind == "first" else None
        # `serve --record DIR`: a sample of the request text (token ids) kept for `prism-deploy adapt`
        self.recorder = None
        if kind == "first":
            from prism_deploy.serving import record

            source = str(getattr(self.stage, "manifest", {}).get("source", ""))  # model.json's
            self.recorder = record.from_environment(config["name"], Path(source).name, int(self.vocab or 0))

    def _read(self, request: Any) -> tuple[np.ndarray, np.ndarray | None]:
        names = input_names(self.kind)
        x = _input(request, names[0])
        assert x is not None
        mask = _input(request, names[1]) if len(names) > 1 else None
        # zero tokens are legal adapter input, answered with zero rows as by ``load_engines(...).run``;
        # a model stage needs at least one position
        if x.ndim < 2 or x.shape[1] < (0 if self.kind == "adapter" else 1):
            raise RequestError(
                f"{names[0]}: expected [batch, seq{', width' if self.width else ''}], got {list(x.shape)}"
            )
        if x.shape[1] > self.max_seq:
            raise RequestError(f"{names[0]}: {x.shape[1]} positions, more than this model's {self.max_seq}")
        if self.width is not None and (x.ndim != 3 or x.shape[2] != self.width):
            raise RequestError(f"{names[0]}: expected [batch, seq, {self.width}], got {list(x.shape)}")
        if self.vocab is not None and x.size and (x.min() < 0 or x.max() >= self.vocab):
            raise RequestError(f"{names[0]}: ids must be in 0..{self.vocab - 1}")
        if mask is not None and mask.shape != x.shape[:2]:
            raise RequestError(f"attention_mask: shape {list(mask.shape)} differs from {names[0]} {list(x.shape[:2])}")
        return x, mask

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = _pb()
        responses: list[Any] = [None] * len(requests)
        ready: list[tuple[int, np.ndarray, np.ndarray | None]] = []
        for i, request in enumerate(requests):
            try:
                x, mask = self._read(request)
                ready.append((i, x, mask))
            except RequestError as exc:
                responses[i] = _error_response(str(exc))
                continue
            if self.recorder is not None:
                self._record(x, mask)
        for group in self._groups(ready):
            try:
                outs = self._run(group)
            except Exception as exc:  # one failed run answers its requests, the server keeps serving
                for i, _, _ in group:
                    responses[i] = _error_response(f"{self.kind} stage failed: {exc}", invalid=False)
                continue
            for (i, _, _), out in zip(group, outs):
                responses[i] = pb.InferenceResponse(output_tensors=[pb.Tensor(output_name(self.kind), out)])
        return responses

    def _record(self, x: np.ndarray, mask: np.ndarray | None) -> None:
        try:
            assert self.recorder is not None
            self.recorder.offer(x, mask)
        except Exception as exc:  # recording never fails a request; the server's log says why
            _pb().Logger.log_warn(f"{self.kind}: request not recorded ({exc})")

    def _groups(self, ready: list[tuple[int, np.ndarray, np.ndarray | None]]) -> list[list[Any]]:
        if self.kind == "adapter":  # per token: any shapes run together
            return [ready] if ready else []
        by_len: dict[int, list[Any]] = {}
        for item in ready:
            by_len.setdefault(int(item[1].shape[1]), []).append(item)
        return list(by_len.values())

    def _run(self, group: list[tuple[int, np.ndarray, np.ndarray | None]]) -> list[np.ndarray]:
        if self.kind == "adapter":
            flat = np.concatenate([x.reshape(-1, x.shape[-1]) for _, x, _ in group], axis=0)
            y = self.stage.run(flat[None])[0]
            outs, start = [], 0
            for _, x, _ in group:
                n = x.shape[0] * x.shape[1]
                outs.append(np.ascontiguousarray(y[start : start + n].reshape(*x.shape[:2], y.shape[-1])))
                start += n
            return outs
        x = np.concatenate([x for _, x, _ in group], axis=0)
        if self.kind == "first":
            x = x.astype(np.int64, copy=False)  # float inputs: cast to the graph's dtype by its runner
        mask = np.concatenate([m for _, _, m in group if m is not None], axis=0).astype(np.int64, copy=False)
        y = np.asarray(self.stage.run(x, mask), dtype=np.float32)  # float32 at the Triton interface
        bounds = np.cumsum([0] + [g[1].shape[0] for g in group])
        return [np.ascontiguousarray(y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


class DecodeModel:
    """The last model's KV-cache graph, one request at a time (past lengths differ)."""

    def __init__(self, version_dir: Path, params: dict[str, str]) -> None:
        from prism_deploy.runtime.model_stage import ModelStage

        stage = stage_runtime.open_stage(
            version_dir / stage_runtime.STAGE_DIR, "last", params.get("prism_provider", "cpu")
        )
        assert isinstance(stage, ModelStage)
        self.stage = stage
        self.past_inputs, self.present_outputs = past_names(stage.layers), past_names(stage.layers, "present")
        _ = stage.past_graph  # opened at load time, not on the first request

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = _pb()
        responses = []
        for request in requests:
            try:
                embeds, mask = _input(request, "inputs_embeds"), _input(request, "attention_mask")
                assert embeds is not None and mask is not None
                past_given = {n: _input(request, n, required=False) for n in self.past_inputs}
                if all(v is None for v in past_given.values()):
                    past = self.stage.empty_past(embeds.shape[0])
                elif any(v is None for v in past_given.values()):
                    raise RequestError("give all past_key_values.* inputs or none")
                else:
                    past = {k: v for k, v in past_given.items() if v is not None}
                past_len = next(iter(past.values())).shape[2]
                if mask.shape != (embeds.shape[0], past_len + embeds.shape[1]):
                    raise RequestError(
                        f"attention_mask: expected [{embeds.shape[0]}, {past_len + embeds.shape[1]}] "
                        f"(past + new positions), got {list(mask.shape)}"
                    )
                if mask.shape[1] > self.stage.max_seq:
                    raise RequestError(f"{mask.shape[1]} positions, more than the model's max_seq {self.stage.max_seq}")
                logits, present = self.stage.step(embeds, mask.astype(np.int64, copy=False), past)
            except RequestError as exc:
                responses.append(_error_response(str(exc)))
                continue
            except Exception as exc:
                responses.append(_error_response(f"decode failed: {exc}", invalid=False))
                continue
            # float32 at the Triton interface, whatever the graph's own dtype
            tensors = [pb.Tensor("logits", np.ascontiguousarray(logits, dtype=np.float32))]
            tensors += [
                pb.Tensor(out, np.ascontiguousarray(host(present[inp]), dtype=np.float32))
                for inp, out in zip(self.past_inputs, self.present_outputs)
            ]
            responses.append(pb.InferenceResponse(output_tensors=tensors))
        return responses


def _last_position(logits: np.ndarray) -> np.ndarray:
    """[b, vocab] from the Python decode model; [b, s, vocab] from a native (ONNX Runtime) one."""
    return logits[:, -1] if logits.ndim == 3 else logits


class GenerateModel:
    """Greedy decoding through the stage models by Business Logic Scripting."""

    def __init__(self, version_dir: Path, params: dict[str, str], decoupled: bool) -> None:
        self.stages = json.loads(params["stages"])  # [{"model", "kind"}], the prefix up to the last model
        self.decode_model = params["decode_model"]
        self.max_seq = int(params["max_seq"])
        self.max_batch = int(params["max_batch"])
        self.vocab_first = int(params["vocab_first"])
        self.default_eos = int(params["eos_token_id"]) if params.get("eos_token_id", "") not in ("", "none") else None
        self.max_new_limit = int(params.get("max_new_tokens_limit", "256"))
        self.decoupled = decoupled
        self.empty_past = json.loads(params["past_shape"]) if params.get("decode_needs_past") == "1" else None
        # an ort-form last model decodes here, on its shared KV buffer (repository._generate_in_process)
        self.last: Any = None
        if params.get("decode_in_process") == "1":
            self.last = stage_runtime.open_stage(
                version_dir / stage_runtime.STAGE_DIR, "last", params.get("prism_provider", "cpu")
            )
        else:
            self.embed = np.load(version_dir / params["embed_tokens"], mmap_mode="r")
            self.present = json.loads(params["present_outputs"])
            self.past = json.loads(params["past_inputs"])

    def _bls(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        pb = _pb()
        request = pb.InferenceRequest(
            model_name=model,
            requested_output_names=outputs,
            inputs=[pb.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()],
        )
        response = request.exec()
        if response.has_error():
            raise RequestError(f"{model}: {response.error().message()}")
        return [np.array(pb.get_output_tensor_by_name(response, n).as_numpy()) for n in outputs]

    def _read(self, request: Any) -> tuple[np.ndarray, np.ndarray, int, int | None]:
        ids = _input(request, "input_ids")
        assert ids is not None
        mask = _input(request, "attention_mask", required=False)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise RequestError(f"input_ids: expected [batch, seq], got {list(ids.shape)}")
        if ids.shape[0] > self.max_batch:
            raise RequestError(f"input_ids: batch {ids.shape[0]} is over the stage models' {self.max_batch}")
        if ids.min() < 0 or ids.max() >= self.vocab_first:
            raise RequestError(f"input_ids: ids must be in 0..{self.vocab_first - 1}")
        mask = np.ones_like(ids) if mask is None else mask
        if mask.shape != ids.shape:
            raise RequestError(f"attention_mask: shape {list(mask.shape)} differs from input_ids {list(ids.shape)}")
        n = _input(request, "max_new_tokens", required=False)
        max_new = 16 if n is None else int(np.asarray(n).reshape(-1)[0])
        if not 1 <= max_new <= self.max_new_limit:
            raise RequestError(f"max_new_tokens: {max_new} must be in 1..{self.max_new_limit}")
        if ids.shape[1] + max_new - 1 > self.max_seq:
            raise RequestError(
                f"{ids.shape[1]} prefix tokens + {max_new} new ones exceed the chain's max_seq {self.max_seq}"
            )
        e = _input(request, "eos_token_id", required=False)
        eos = self.default_eos if e is None else int(np.asarray(e).reshape(-1)[0])
        return ids.astype(np.int64), mask.astype(np.int64), max_new, (None if eos is None or eos < 0 else eos)

    def _prefix(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        x: np.ndarray = ids
        for stage in self.stages:
            kind = stage["kind"]
            names = input_names(kind)
            feeds = {names[0]: x, **({names[1]: mask} if len(names) > 1 else {})}
            x = self._bls(stage["model"], feeds, [output_name(kind)])[0]
        return x

    def _tokens(self, request: Any) -> Any:
        """Yields the chosen tokens [b] step by step."""
        ids, mask, max_new, eos = self._read(request)
        embeds = self._prefix(ids, mask)
        if self.last is not None:
            yield from self._tokens_in_process(embeds, mask, max_new, eos)
            return
        first = {"inputs_embeds": embeds, "attention_mask": mask}
        if self.empty_past is not None:  # a native decode model has no optional inputs: an empty cache
            first.update(
                {n: np.zeros((ids.shape[0], self.empty_past[0], 0, self.empty_past[1]), np.float32) for n in self.past}
            )
        outs = self._bls(self.decode_model, first, ["logits", *self.present])
        logits, past = _last_position(outs[0]), dict(zip(self.past, outs[1:]))

        def step(token: np.ndarray, mask: np.ndarray) -> np.ndarray:
            nonlocal past
            step_embeds = np.asarray(self.embed[token], dtype=np.float32)[:, None, :]
            outs = self._bls(
                self.decode_model,
                {"inputs_embeds": step_embeds, "attention_mask": mask, **past},
                ["logits", *self.present],
            )
            past = dict(zip(self.past, outs[1:]))
            return _last_position(outs[0])

        for token in greedy_tokens(logits, mask, step, max_new, eos):
            yield token.astype(np.int64)

    def _tokens_in_process(self, embeds: np.ndarray, mask: np.ndarray, max_new: int, eos: int | None) -> Any:
        """The last model's prefill and steps on one preallocated KV buffer, as the chain runs them."""
        last = self.last
        cache = last.empty_past(embeds.shape[0])
        logits, _ = last.step(embeds, mask, cache)

        def step(token: np.ndarray, mask: np.ndarray) -> np.ndarray:
            step_embeds = np.asarray(last.embed_tokens[token], dtype=np.float32)[:, None, :]
            return last.step(step_embeds, mask, cache)[0]

        for token in greedy_tokens(logits, mask, step, max_new, eos):
            yield token.astype(np.int64)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        pb = _pb()
        if self.decoupled:
            for request in requests:
                sender = request.get_response_sender()
                try:
                    for token in self._tokens(request):
                        sender.send(pb.InferenceResponse(output_tensors=[pb.Tensor("tokens", token[:, None])]))
                    sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except RequestError as exc:
                    sender.send(_error_response(str(exc)), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception as exc:
                    sender.send(
                        _error_response(f"generate failed: {exc}", invalid=False),
                        flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                    )
            return None
        responses = []
        for request in requests:
            try:
                tokens = np.stack(list(self._tokens(request)), axis=1)
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("tokens", tokens)]))
            except RequestError as exc:
                responses.append(_error_response(str(exc)))
            except Exception as exc:
                responses.append(_error_response(f"generate failed: {exc}", invalid=False))
        return responses
