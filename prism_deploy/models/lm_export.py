"""Export local decoder-only causal LMs to ONNX as the models of a PRISM chain.

- ``first``: ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, seq] int64 -> ``hidden``
  [batch, seq, d]: the last hidden state after the final norm, before the LM head (``first.onnx``).
- ``middle``: ``inputs_embeds`` [batch, seq, d], ``attention_mask`` -> ``hidden`` [batch, seq, d],
  the same state, read from embeddings instead of ids (``middle.onnx``).
- ``last``: ``inputs_embeds`` [batch, seq, d], ``attention_mask`` [batch, seq] int64 -> ``logits``
  [batch, seq, vocab] (``last.onnx``); and ``last_with_past.onnx`` with the KV cache for greedy
  continuation: extra inputs ``past_key_values.<i>.key|value`` [batch, kv_heads, past, head_dim],
  ``attention_mask`` then covering past + new tokens, extra outputs ``present.<i>.key|value``
  [batch, kv_heads, past + new, head_dim]. A past of length 0 is allowed, so the same graph does
  the prefill. ``embed_tokens.npy`` [vocab, d] holds the model's input embedding matrix, which
  the generation loop needs to feed its own tokens back. ``last_with_past.onnx`` also takes an
  optional ``logits_start`` (default 0: every position; generation feeds -1 and the LM head runs
  on the last position only: :mod:`prism_deploy.models.logits_positions`).

(``upper`` and ``lower``, the names before chains, are ``first`` and ``last``.)

Position ids are derived inside every graph from ``attention_mask`` (cumulative count of real
tokens minus one, as ``generate`` does for left padding), so left-padded batches give the same
numbers as ``transformers`` given those position ids; without padding they equal ``arange``.

Exporter: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer). On torch 2.13 the
default dynamo exporter needs ``onnxscript``, which is not a dependency of this project, and
the tracer exports these models in well under a second with dynamic batch/sequence axes. The
models are loaded with ``attn_implementation="eager"`` for the trace: the eager path always
materialises the attention mask, so no shape-dependent shortcut of the SDPA path (taken or not
at the traced shape) is frozen into the graph. Validation compares with that float32 model in
``transformers``; the end-to-end parity check (:mod:`prism_deploy.parity.chain_parity`) compares with
the models as ``transformers`` loads them by default (SDPA attention).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism_deploy.core import defaults
from prism_deploy.core.errors import PrismInputError, brief
from prism_deploy.core.fsutil import file_sha256, folder_lock
from prism_deploy.core.precision import ModelPrecision
from prism_deploy.format.model_folder import (
    FORMAT,
    LOCK_NAME,
    MODEL_JSON,
    TRACE_MARK,
    TRACE_PREFIX,
    VERSION,
    canonical_role,
    check_export_folder,
    io_description,
    is_own_trace,
    past_names,
)
from prism_deploy.format.stage_io import STAGE_IO
from prism_deploy.models import export_checks, gguf, hf
from prism_deploy.models.logits_positions import add_logits_start_to

# Validation against the float32 transformers model: prism_deploy.models.export_checks.


class _First(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return hf.final_hidden(self.model, input_ids, attention_mask)


class _Middle(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return hf.final_hidden(self.model, None, attention_mask, inputs_embeds=inputs_embeds)


class _Last(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits, _ = hf.causal_lm_forward(self.model, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        return logits


class _LastWithPast(torch.nn.Module):
    def __init__(self, model: Any, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        logits, cache = hf.causal_lm_forward(
            self.model,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=hf.make_cache(pairs),
            use_cache=True,
        )
        flat: list[torch.Tensor] = [logits]
        for k, v in hf.cache_pairs(cache):
            flat += [k, v]
        return tuple(flat)


def export_model(
    hf_dir: str | os.PathLike[str],
    role: str,
    out_dir: str | os.PathLike[str],
    *,
    precision: ModelPrecision | str = defaults.MODEL_PRECISION,
    max_seq: int | None = None,
    validate: bool = True,
    seed: int = 0,
    quantization: Any = None,
    force: bool = False,
    text: str | os.PathLike[str] | None = None,
    calibration_text: str | None = None,
    calibration_inputs: tuple[list[np.ndarray], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Export ``hf_dir`` as ``role`` into ``out_dir`` and validate it; returns the manifest.

    ``int8``/``int4``: the float32 graphs are traced, then their weights quantized
    (:func:`prism_deploy.models.quantize.quantize_graph`) with ``quantization`` (a ``QuantSpec``
    from ``quantize.make_spec``; default: ``make_spec(precision)``). GPTQ and the mixed plan
    calibrate on ``calibration_text``'s token embeddings, or, for a middle or last model,
    on ``calibration_inputs``: what it will read in its chain (the upstream adapter's outputs on
    text, one ``[tokens, hidden]`` array per text) and the record of where they came from.

    Validation runs on random inputs (embedding rows plus noise, random ids) and, where the model
    has a tokenizer, on real text: the held-out part of ``text`` (a UTF-8 file; default: the
    corpus every machine has, :mod:`prism_deploy.core.corpus`). A model that predicts that text
    (a language model with real weights) is judged by its real-text figures, next-token
    agreement and perplexity included (``tolerances.real_text``); the random-input figures are
    then reported, not gated. Any other model (random weights, an encoder) keeps the random-input
    checks, and its real-text figures are checked with the same bounds.

    Raises ``PrismInputError`` for a bad folder/option and ``CheckFailed`` when an exported graph
    diverges from the transformers model beyond the precision's tolerances (the manifest is
    then not written, so the folder is not usable as a pipeline part).
    """
    role = canonical_role(role)
    prec = ModelPrecision.parse(precision)  # the export's edge: a name from an API caller is parsed once, here
    from prism_deploy.models import quantize

    if calibration_inputs is not None and role == "first":
        raise PrismInputError(
            "--calibration-chain: a first model reads token ids, not an adapter's output; it calibrates on text"
        )
    if prec.weight_only and quantization is None:
        quantization = quantize.make_spec(prec)
    if quantization is not None and prec.bits != quantization.bits:
        raise PrismInputError(f"--precision {prec}: the quantization options are for {quantization.bits} bits")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PrismInputError(f"{out_dir}: exists and is not a folder")
    check_export_folder(out, force)  # before the model is loaded: nothing of the user's is replaced
    from prism_deploy.core import corpus

    text_corpus = corpus.load(text) if validate else None  # a bad --text is said before the long load
    started = time.perf_counter()
    # One load: the float32 model is both what validation compares with and, for fp32, what is
    # traced (big models are loaded once, not twice); fp16 traces a half-precision copy.
    reference = hf.load_causal_lm(hf_dir, attn_implementation="eager", uses_head=role == "last")
    # a model read from one file (GGUF): model.json names that file and its digest
    source_file = {"source_file": gguf.source_record(hf_dir)} if gguf.is_gguf(hf_dir) else {}
    limit = hf.max_positions(reference.config)
    if max_seq is None:
        max_seq = min(limit or 2048, 2048)
    if max_seq < 2 or (limit is not None and max_seq > limit):
        raise PrismInputError(f"--max-seq: {max_seq} must be in 2..{limit or 'inf'} (the model's position limit)")
    dtype = getattr(torch, prec.float_dtype.name)  # int8/int4 trace float32, then quantize
    traced = reference if dtype == torch.float32 else copy.deepcopy(reference).to(dtype)
    dims = hf.cache_dims(reference.config)
    # first: the ids its embedding table accepts; middle, last: the width of its logits
    vocab = int(
        (reference.get_input_embeddings() if role == "first" else reference.get_output_embeddings()).weight.shape[0]
    )
    embed_std = float(hf.input_embedding_matrix(reference).std())
    family, eos_token_id = hf.family(reference), _eos_token_id(reference)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(out, LOCK_NAME):
            check_export_folder(out, force)  # again, under the lock: another export may have written
            for stale in out.glob(f"{TRACE_PREFIX}*"):  # a killed export's scratch folders (none runs now)
                if is_own_trace(stale):
                    shutil.rmtree(stale, ignore_errors=True)
            try:
                # An old manifest would describe graphs this run is about to replace: drop it first, write it last.
                (out / MODEL_JSON).unlink(missing_ok=True)

                # a float graph about to be quantized keeps its weights in a data file whatever its
                # size: the quantizer reads them one at a time instead of parsing the whole graph
                external = True if quantization is not None else None
                if role == "first":
                    files, written = _export_first(traced, out, vocab, external)
                elif role == "middle":
                    files, written = _export_middle(traced, out, dims, external)
                else:
                    files, written = _export_last(traced, out, dims, external)
                    from prism_deploy.core.fsutil import atomic_output

                    with atomic_output(out / files["embed_tokens"]) as tmp:
                        with open(tmp, "wb") as fh:
                            np.save(fh, hf.input_embedding_matrix(reference).astype(prec.float_dtype))
                quantized: dict[str, Any] = {}
                calibration: dict[str, Any] | None = None
                if quantization is not None:
                    written = [n for n in written if not n.endswith(".data")]
                    activations, plan, plan_errors = None, None, None
                    if quantization.needs_calibration:
                        if calibration_inputs is not None:
                            feeds, calibration = embedding_feeds(*calibration_inputs, dims["hidden"])
                        else:
                            feeds, calibration = _calibration_feeds(hf_dir, reference, role, calibration_text)
                        activations = quantize.layer_inputs(out / files["graph"], feeds)
                    if _holds_over_2_gib(reference) and not quantization.needs_calibration:
                        # The PyTorch model is let go while the graphs are quantized (and loaded
                        # again for the validation): holding both took model L's (3.3 GB) int8
                        # export to 2.7x its float weights.
                        reference = traced = None
                        gc.collect()
                    for key in ("graph", "graph_with_past"):
                        if key in files:  # quantized in place; a float graph's external data file goes
                            stale = out / (files[key] + ".data")
                            # the KV graph has the same nodes and weights: it takes the first graph's plan
                            quantized[key] = quantize.quantize_graph(
                                out / files[key],
                                out / files[key],
                                quantization,
                                activations=activations,
                                plan=plan,
                                plan_errors=plan_errors,
                            )
                            if quantization.mixed:
                                plan, plan_errors = quantize.plan_of(quantized[key])
                            written += quantized[key]["files"]
                            if stale.name not in quantized[key]["files"]:
                                stale.unlink(missing_ok=True)
                    del activations
                for name in written:
                    if name.endswith(".data"):  # external weights of a graph over 2 GiB
                        files[name.split(".")[0] + "_data"] = name
                export_s = time.perf_counter() - started

                validation: dict[str, Any] = {"skipped": True}
                if validate:
                    if reference is None:  # let go while quantizing
                        reference = hf.load_causal_lm(hf_dir, attn_implementation="eager", uses_head=role == "last")
                    # the float model's side first, then the graphs' with the model let go: one
                    # session at a time, never beside the float weights (models/export_checks.py)
                    expected = export_checks.expect(reference, role, max_seq, seed, hf_dir, text_corpus)
                    reference = traced = None
                    gc.collect()
                    gate_random = expected.real is None or not expected.real["language_model"]
                    validation = export_checks.check(expected, out, files, prec, gate_random)
                manifest = {
                    "format": FORMAT,
                    "version": VERSION,
                    "role": role,
                    "family": family,
                    "known_family": family in hf.KNOWN_FAMILIES,
                    "source": str(Path(hf_dir).resolve()),
                    **source_file,
                    "precision": prec.value,
                    "max_seq": max_seq,
                    "dims": {
                        "hidden": dims["hidden"],
                        "vocab": vocab,
                        "layers": dims["layers"],
                        "kv_heads": dims["kv_heads"],
                        "head_dim": dims["head_dim"],
                    },
                    # the scale of its input embeddings: random inputs of that size check a middle model's build
                    "embed_std": embed_std,
                    "io": io_description(role, dims["layers"]),
                    "files": {key: {"name": name, "sha256": file_sha256(out / name)} for key, name in files.items()},
                    "position_ids": "cumsum(attention_mask) - 1 (padding slots: 1), computed inside each graph",
                    "exporter": "torch.onnx.export (TorchScript tracer, dynamo=False), eager attention",
                    "opset": _opset(quantized),
                    "export_seconds": round(export_s, 3),
                    "eos_token_id": eos_token_id,
                    "validation": validation,
                    "versions": _versions(),
                }
                if quantized:
                    # the form, block size and per-layer choices of each graph; weights stay float in embed_tokens.npy
                    manifest["quantization"] = {
                        **quantization.to_json(),
                        "graphs": quantized,
                        **({"calibration": calibration} if calibration else {}),
                    }
                from prism_deploy.core.fsutil import write_text_atomic

                write_text_atomic(out / MODEL_JSON, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            except BaseException:
                _remove_export_files(out, role)  # a failed export leaves no graph without its model.json
                raise
    except BaseException:
        if created:  # a failed export into a folder it made leaves no folder behind
            with contextlib.suppress(OSError):
                (out / LOCK_NAME).unlink(missing_ok=True)
                out.rmdir()
        raise
    return manifest


def _holds_over_2_gib(model: Any) -> bool:
    """Whether the PyTorch model's weights pass the size above which graphs keep external data."""
    from prism_deploy.core.onnx_io import EXTERNAL_DATA_THRESHOLD

    return sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_THRESHOLD


# Calibration for GPTQ and the mixed plan: this many tokens of text, in windows of this many.
CALIBRATION_TOKENS = 512
CALIBRATION_WINDOW = 256


def default_calibration_text() -> tuple[str, str]:
    """The calibration part of the default corpus (:mod:`prism_deploy.core.corpus`): text every
    Python has, kept apart from the held-out part that validation and the benchmarks measure on."""
    from prism_deploy.core import corpus

    default = corpus.default()
    return default.text("calibration"), f"{default.name} (calibration part)"


def _calibration_feeds(
    hf_dir: Any, reference: Any, role: str, text: str | None
) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """The graph's inputs on calibration text: token ids (first) or their input embeddings
    (middle, last), ``CALIBRATION_TOKENS`` tokens in windows of ``CALIBRATION_WINDOW``."""
    from prism_deploy.models.tokenizers import load_tokenizer

    source = "--calibration-text"
    if text is None:
        text, source = default_calibration_text()
    tokenizer = load_tokenizer(hf_dir)
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)[:CALIBRATION_TOKENS]
    if len(ids) < 16:
        raise PrismInputError(f"{source}: {len(ids)} tokens; calibration needs at least 16")
    table = hf.input_embedding_matrix(reference) if role != "first" else None
    feeds: list[dict[str, np.ndarray]] = []
    for start in range(0, len(ids), CALIBRATION_WINDOW):
        window = ids[None, start : start + CALIBRATION_WINDOW]
        mask = np.ones_like(window)
        feeds.append(
            {"input_ids": window, "attention_mask": mask}
            if table is None
            else {"inputs_embeds": table[window].astype(np.float32), "attention_mask": mask}
        )
    return feeds, {"source": source, "tokens": int(len(ids)), "window": CALIBRATION_WINDOW}


def embedding_feeds(
    inputs: list[np.ndarray], source: dict[str, Any], hidden: int
) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """A middle or last graph's inputs from the embeddings it will read in its chain (one
    ``[tokens, hidden]`` array per text, e.g. the upstream adapter's outputs): the first
    ``CALIBRATION_TOKENS`` tokens, each text in windows of ``CALIBRATION_WINDOW``."""
    where = source.get("chain", "calibration inputs")
    feeds: list[dict[str, np.ndarray]] = []
    tokens = 0
    for rows in inputs:
        if rows.ndim != 2 or rows.shape[1] != hidden:
            raise PrismInputError(
                f"{where}: the calibration inputs are {list(rows.shape)} wide rows; this model reads [tokens, {hidden}]"
            )
        rows = np.asarray(rows[: CALIBRATION_TOKENS - tokens], dtype=np.float32)
        if not np.isfinite(rows).all():
            raise PrismInputError(f"{where}: the calibration inputs hold NaN or Inf")
        for start in range(0, len(rows), CALIBRATION_WINDOW):
            window = rows[None, start : start + CALIBRATION_WINDOW]
            feeds.append({"inputs_embeds": window, "attention_mask": np.ones(window.shape[:2], dtype=np.int64)})
        tokens += len(rows)
        if tokens >= CALIBRATION_TOKENS:
            break
    if tokens < 16:
        raise PrismInputError(f"{where}: {tokens} tokens of calibration inputs; calibration needs at least 16")
    return feeds, {**source, "tokens": tokens, "window": CALIBRATION_WINDOW}


def _remove_export_files(out: Path, role: str) -> None:
    """The files an export of ``role`` writes (graphs, their external data, the embedding table),
    removed after a failure: without a model.json they are no usable export."""
    names = {
        "first": ["first.onnx"],
        "middle": ["middle.onnx"],
        "last": ["last.onnx", "last_with_past.onnx", "embed_tokens.npy"],
    }[role]
    for name in [*names, *(n + ".data" for n in names)]:
        with contextlib.suppress(OSError):
            (out / name).unlink(missing_ok=True)


# -- export -------------------------------------------------------------------------------------------


def _export_hidden_role(
    role: str, traced: Any, out: Path, example: tuple[Any, ...], external: bool | None
) -> tuple[dict[str, str], list[str]]:
    """``first.onnx`` or ``middle.onnx``: the role's inputs -> ``hidden``, names and dynamic dims
    from the stage I/O contract (format/stage_io)."""
    files = {"graph": f"{role}.onnx"}
    inputs, outputs = STAGE_IO[role]
    dynamic = {t.name: {i: d for i, d in enumerate(t.dims) if d in ("batch", "seq")} for t in (*inputs, *outputs)}
    module = _First(traced) if role == "first" else _Middle(traced)
    written = _export_graph(
        module, example, out / files["graph"], [t.name for t in inputs], [t.name for t in outputs], dynamic, external
    )
    return files, written


def _export_first(traced: Any, out: Path, vocab: int, external: bool | None) -> tuple[dict[str, str], list[str]]:
    g = torch.Generator().manual_seed(0)
    example = (torch.randint(0, vocab, (2, 4), generator=g), torch.ones(2, 4, dtype=torch.int64))
    return _export_hidden_role("first", traced, out, example, external)


def _export_middle(
    traced: Any, out: Path, dims: dict[str, int], external: bool | None
) -> tuple[dict[str, str], list[str]]:
    dtype = next(traced.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    example = (torch.randn(2, 4, dims["hidden"], generator=g).to(dtype), torch.ones(2, 4, dtype=torch.int64))
    return _export_hidden_role("middle", traced, out, example, external)


def _export_last(
    traced: Any, out: Path, dims: dict[str, int], external: bool | None
) -> tuple[dict[str, str], list[str]]:
    """``last.onnx`` and ``last_with_past.onnx`` (the embedding table is written by the caller)."""
    files = {"graph": "last.onnx", "graph_with_past": "last_with_past.onnx", "embed_tokens": "embed_tokens.npy"}
    dtype = next(traced.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    d, layers = dims["hidden"], dims["layers"]
    emb = torch.randn(2, 4, d, generator=g).to(dtype)
    written = _export_graph(
        _Last(traced),
        (emb, torch.ones(2, 4, dtype=torch.int64)),
        out / files["graph"],
        ["inputs_embeds", "attention_mask"],
        ["logits"],
        {
            "inputs_embeds": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "logits": {0: "batch", 1: "seq"},
        },
        external,
    )
    # Traced with a past of 3 and 2 new tokens: the general path, valid for past 0 and new 1 too.
    past = [torch.randn(2, dims["kv_heads"], 3, dims["head_dim"], generator=g).to(dtype) for _ in range(2 * layers)]
    emb2 = torch.randn(2, 2, d, generator=g).to(dtype)
    axes: dict[str, dict[int, str]] = {
        "inputs_embeds": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total_seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    axes.update({n: {0: "batch", 2: "past_seq"} for n in past_names(layers)})
    axes.update({n: {0: "batch", 2: "total_seq"} for n in past_names(layers, "present")})
    written += _export_graph(
        _LastWithPast(traced, layers),
        (emb2, torch.ones(2, 5, dtype=torch.int64), *past),
        out / files["graph_with_past"],
        ["inputs_embeds", "attention_mask", *past_names(layers)],
        ["logits", *past_names(layers, "present")],
        axes,
        external,
        # generation asks for the last position's logits only
        edit=lambda model: add_logits_start_to(model, files["graph_with_past"]),
    )
    return files, written


def _export_graph(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    external: bool | None = None,
    edit: Any = None,
) -> list[str]:
    """Trace the graph without its weights into a scratch folder, then save it once through
    ``finalize`` + ``save_model``, the weights streamed from the PyTorch tensors
    (:mod:`prism_deploy.models.trace`). ``external``: weights in ``<name>.data`` whatever their
    size (a float graph about to be quantized: the quantizer then reads one weight at a time).
    ``edit(model)``: a change to the graph before it is saved. Returns the file names written."""
    import tempfile

    import onnx

    from prism_deploy.core.onnx_io import OPSET, WeightReader, finalize, save_model
    from prism_deploy.models import trace

    # The exporter puts the module back in the training mode it found it in: a fresh wrapper is
    # in training mode, which would switch on the wrapped model's dropout for the validation
    # that follows. Wrappers are exported in eval mode.
    module.eval()
    with tempfile.TemporaryDirectory(prefix=TRACE_PREFIX, dir=path.parent) as scratch:
        (Path(scratch) / TRACE_MARK).touch()  # proves the folder ours if this process is killed
        traced = Path(scratch) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad(), trace.exported_weights() as weights:
            # The tracer warns about every Python-side shape test it freezes; the validation
            # step is what checks that the frozen branches hold for other shapes.
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    module,
                    args,
                    str(traced),
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                    opset_version=OPSET,
                    dynamo=False,
                    do_constant_folding=True,
                    export_params=weights is None,
                )
            except OSError:
                raise  # a full disk or a read-only folder is not the model's fault (the CLI names the output)
            except Exception as exc:  # the tracer raises many types; the CLI promises one line
                raise PrismInputError(
                    f"{path.name}: torch.onnx.export cannot trace this model ({type(exc).__name__}: {brief(exc, 300)})"
                ) from exc
            model = onnx.load(str(traced), load_external_data=False)
            if weights is not None:
                deferred = trace.attach_weights(model, weights)
            else:  # a torch without the exporter table: its own file(s), copied a block at a time
                deferred = WeightReader(model, Path(scratch)).deferred(model)
            if edit is not None:
                edit(model)
            written = save_model(finalize(model), path, external=external, deferred=deferred)
            del weights
    return [p.name for p in written]


def _eos_token_id(model: Any) -> int | None:
    """The id that ends generation (the generation config's first, else the config's), if any."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is not None:
            return int(eos)
    return None


def _opset(quantized: dict[str, Any]) -> dict[str, int]:
    """The opset and IR version the folder's graphs were written at (int4 graphs: 21 / 10)."""
    from prism_deploy.core.onnx_io import IR_VERSION, OPSET

    return {
        "opset": max([OPSET, *(int(q["opset"]) for q in quantized.values())]),
        "ir_version": max([IR_VERSION, *(int(q["ir_version"]) for q in quantized.values())]),
    }


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    from prism_deploy.core.version import __version__

    return {
        "prism_deploy": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
