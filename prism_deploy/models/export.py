"""Export local decoder-only causal LMs to ONNX as the two ends of a PRISM pipeline.

- ``upper`` (model A): ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, seq] int64
  -> ``hidden`` [batch, seq, d_A]: the last hidden state after the final norm, before the LM head.
- ``lower`` (model B): ``inputs_embeds`` [batch, seq, d_B], ``attention_mask`` [batch, seq] int64
  -> ``logits`` [batch, seq, vocab_B] (``lower.onnx``); and ``lower_with_past.onnx`` with the KV
  cache for greedy continuation: extra inputs ``past_key_values.<i>.key|value``
  [batch, kv_heads, past, head_dim], ``attention_mask`` then covering past + new tokens, extra
  outputs ``present.<i>.key|value`` [batch, kv_heads, past + new, head_dim]. A past of length 0
  is allowed, so the same graph does the prefill. ``embed_tokens.npy`` [vocab_B, d_B] holds model
  B's input embedding matrix, which the generation loop needs to feed its own tokens back.

Position ids are derived inside every graph from ``attention_mask`` (cumulative count of real
tokens minus one, as ``generate`` does for left padding), so left-padded batches give the same
numbers as ``transformers`` given those position ids; without padding they equal ``arange``.

Exporter: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer). On torch 2.13 the
default dynamo exporter needs ``onnxscript``, which is not a dependency of this project, and
the tracer exports these models in well under a second with dynamic batch/sequence axes. The
models are loaded with ``attn_implementation="eager"`` for the trace: the eager path always
materialises the attention mask, so no shape-dependent shortcut of the SDPA path (taken or not
at the traced shape) is frozen into the graph. Validation compares with that float32 model in
``transformers``; the end-to-end parity check (:mod:`prism_deploy.parity.pipeline`) compares with
the models as ``transformers`` loads them by default (SDPA attention).
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism_deploy.errors import CheckFailed, PrismInputError
from prism_deploy.models import hf
from prism_deploy.fsutil import file_sha256

ROLES = ("upper", "lower")
PRECISIONS = ("fp32", "fp16", "int8", "int4")  # int8/int4: weight-only, models/quantize.py
MANIFEST = "model.json"
MANIFEST_VERSION = 1

# Validation tolerances against the float32 transformers model. Relative L2 error over the real
# (unpadded) tokens, the smallest per-token cosine similarity, and top-1 agreement of logits on
# tokens whose reference top-1/top-2 gap is larger than ``tie_gap`` x max|logit| (closer ones are
# counted apart as ambiguous: any rounding may flip them).
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"rel_l2": 1e-4, "min_cosine": 0.9999, "top1": 0.99, "tie_gap": 1e-4},
    "fp16": {"rel_l2": 2e-2, "min_cosine": 0.999, "top1": 0.95, "tie_gap": 1e-2},
}

# Weight-only quantized graphs (models/quantize.py) against the float32 transformers model: the
# same figures plus ``kl_max``, KL(reference || graph) of the next-token distributions in nats,
# worst token. Chosen from measurement (docs/quantized-models.md, "Tolerances": every form and
# option, on the tests' 2-layer models and the 8-layer benchmark models A and B, all random):
# - int8: worst measured rel L2 0.032 (model B, dq form: per-channel scales, and ONNX Runtime's
#   CPU fusion rounds activations to int8), min cosine 0.9993, KL max 1.9e-4, top-1 1.000.
#   Bounds 2.5x the rel L2 and 10x the KL (which grows as the square of the error); a wrong
#   scale or layout gives rel L2 ~1.
# - int4: a step of max|block|/7 is ~8% of a Gaussian weight, and random 8-layer models carry it
#   through: worst measured rel L2 0.385, min cosine 0.915, top-1 0.857 (model B, block 128),
#   KL max 0.022. Bounds 1.3x / 0.93x / 0.93x of those and 4.5x the KL: they catch a broken
#   lowering (rel L2 ~1, cosine ~0), not int4's own rounding; ``tie_gap`` is 0.1 x max|logit|
#   because the logits move by about that much.
QUANTIZED_TOLERANCES: dict[str, dict[str, float]] = {
    "int8": {"rel_l2": 8e-2, "min_cosine": 0.995, "top1": 0.98, "tie_gap": 2e-2, "kl_max": 2e-3},
    "int4": {"rel_l2": 5e-1, "min_cosine": 0.85, "top1": 0.80, "tie_gap": 1e-1, "kl_max": 1e-1},
}


def tolerances(precision: str) -> dict[str, float]:
    return TOLERANCES.get(precision) or QUANTIZED_TOLERANCES[precision]


class _Upper(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return hf.final_hidden(self.model, input_ids, attention_mask)


class _Lower(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits, _ = hf.causal_lm_forward(self.model, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        return logits


class _LowerWithPast(torch.nn.Module):
    def __init__(self, model: Any, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        logits, cache = hf.causal_lm_forward(self.model, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                             cache=hf.make_cache(pairs), use_cache=True)
        flat: list[torch.Tensor] = [logits]
        for k, v in hf.cache_pairs(cache):
            flat += [k, v]
        return tuple(flat)


def past_names(layers: int, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def export_model(hf_dir: str | os.PathLike[str], role: str, out_dir: str | os.PathLike[str], *,
                 precision: str = "fp32", max_seq: int | None = None, validate: bool = True,
                 seed: int = 0, quantization: Any = None) -> dict[str, Any]:
    """Export ``hf_dir`` as ``role`` into ``out_dir`` and validate it; returns the manifest.

    ``int8``/``int4``: the float32 graphs are traced, then their weights quantized
    (:func:`prism_deploy.models.quantize.quantize_graph`) with ``quantization`` (a ``QuantSpec``
    from ``quantize.make_spec``; default: ``make_spec(precision)``).

    Raises ``PrismInputError`` for a bad folder/option and ``CheckFailed`` when an exported graph
    diverges from the transformers model beyond the precision's tolerances (the manifest is
    then not written, so the folder is not usable as a pipeline part).
    """
    if role not in ROLES:
        raise PrismInputError(f"--role: {role!r} is not one of {', '.join(ROLES)}")
    if precision not in PRECISIONS:
        raise PrismInputError(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    from prism_deploy.models import quantize

    if precision in quantize.BITS and quantization is None:
        quantization = quantize.make_spec(precision)
    if quantization is not None and quantize.BITS.get(precision) != quantization.bits:
        raise PrismInputError(f"--precision {precision}: the quantization options are for {quantization.bits} bits")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PrismInputError(f"{out_dir}: exists and is not a folder")
    started = time.perf_counter()
    # One load: the float32 model is both what validation compares with and, for fp32, what is
    # traced (big models are loaded once, not twice); fp16 traces a half-precision copy.
    reference = hf.load_causal_lm(hf_dir, attn_implementation="eager")
    limit = hf.max_positions(reference.config)
    if max_seq is None:
        max_seq = min(limit or 2048, 2048)
    if max_seq < 2 or (limit is not None and max_seq > limit):
        raise PrismInputError(f"--max-seq: {max_seq} must be in 2..{limit or 'inf'} (the model's position limit)")
    dtype = torch.float16 if precision == "fp16" else torch.float32  # int8/int4 trace float32, then quantize
    traced = reference if dtype == torch.float32 else copy.deepcopy(reference).to(dtype)
    dims = hf.cache_dims(reference.config)
    # upper: the ids its embedding table accepts; lower: the width of its logits
    table = reference.get_input_embeddings() if role == "upper" else reference.get_output_embeddings()
    vocab = int(table.weight.shape[0])
    out.mkdir(parents=True, exist_ok=True)
    # An old manifest would describe graphs this run is about to replace: drop it first, write it last.
    (out / MANIFEST).unlink(missing_ok=True)

    if role == "upper":
        files, written = _export_upper(traced, out, vocab)
    else:
        files, written = _export_lower(traced, out, dims)
        from prism_deploy.fsutil import atomic_output

        with atomic_output(out / files["embed_tokens"]) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, hf.input_embedding_matrix(reference).astype(np.float16 if precision == "fp16" else np.float32))
    quantized: dict[str, Any] = {}
    if quantization is not None:
        written = [n for n in written if not n.endswith(".data")]
        for key in ("graph", "graph_with_past"):
            if key in files:  # quantized in place; a float graph's external data file goes
                stale = out / (files[key] + ".data")
                quantized[key] = quantize.quantize_graph(out / files[key], out / files[key], quantization)
                written += quantized[key]["files"]
                if stale.name not in quantized[key]["files"]:
                    stale.unlink(missing_ok=True)
    for name in written:
        if name.endswith(".data"):  # external weights of a graph over 2 GiB
            files[name.split(".")[0] + "_data"] = name
    export_s = time.perf_counter() - started

    validation: dict[str, Any] = {"skipped": True}
    if validate:
        checker = _validate_upper if role == "upper" else _validate_lower
        validation = checker(reference, out, files, precision, max_seq, seed)
    manifest = {
        "format": "prism-deploy-model", "version": MANIFEST_VERSION, "role": role, "family": hf.family(reference),
        "known_family": hf.family(reference) in hf.KNOWN_FAMILIES, "source": str(Path(hf_dir).resolve()),
        "precision": precision, "max_seq": max_seq,
        "dims": {"hidden": dims["hidden"], "vocab": vocab, "layers": dims["layers"], "kv_heads": dims["kv_heads"],
                 "head_dim": dims["head_dim"]},
        "io": _io_description(role, dims["layers"]),
        "files": {key: {"name": name, "sha256": file_sha256(out / name)} for key, name in files.items()},
        "position_ids": "cumsum(attention_mask) - 1 (padding slots: 1), computed inside each graph",
        "exporter": "torch.onnx.export (TorchScript tracer, dynamo=False), eager attention",
        "opset": _opset(), "export_seconds": round(export_s, 3), "eos_token_id": _eos_token_id(reference),
        "validation": validation, "versions": _versions(),
    }
    if quantized:
        # the form, block size and per-layer choices of each graph; weights stay float in embed_tokens.npy
        manifest["quantization"] = {**quantization.to_json(), "graphs": quantized}
    from prism_deploy.fsutil import write_text_atomic

    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(model_dir: str | os.PathLike[str], role: str | None = None) -> dict[str, Any]:
    """``model.json`` of an export folder, checked for the expected role."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise PrismInputError(f"{model_dir}: no {MANIFEST} (not a folder written by `prism-deploy export-model`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PrismInputError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != "prism-deploy-model":
        raise PrismInputError(f"{path}: not a prism-deploy model manifest")
    if role is not None and manifest.get("role") != role:
        raise PrismInputError(f"{model_dir}: exported as role {manifest.get('role')!r}, {role!r} is needed here")
    return manifest


# -- export -------------------------------------------------------------------------------------------


def _export_upper(traced: Any, out: Path, vocab: int) -> tuple[dict[str, str], list[str]]:
    files = {"graph": "upper.onnx"}
    g = torch.Generator().manual_seed(0)
    example = (torch.randint(0, vocab, (2, 4), generator=g), torch.ones(2, 4, dtype=torch.int64))
    written = _export_graph(_Upper(traced), example, out / files["graph"], ["input_ids", "attention_mask"], ["hidden"],
                            {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                             "hidden": {0: "batch", 1: "seq"}})
    return files, written


def _export_lower(traced: Any, out: Path, dims: dict[str, int]) -> tuple[dict[str, str], list[str]]:
    """``lower.onnx`` and ``lower_with_past.onnx`` (the embedding table is written by the caller)."""
    files = {"graph": "lower.onnx", "graph_with_past": "lower_with_past.onnx", "embed_tokens": "embed_tokens.npy"}
    dtype = next(traced.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    d, layers = dims["hidden"], dims["layers"]
    emb = torch.randn(2, 4, d, generator=g).to(dtype)
    written = _export_graph(_Lower(traced), (emb, torch.ones(2, 4, dtype=torch.int64)), out / files["graph"],
                            ["inputs_embeds", "attention_mask"], ["logits"],
                            {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                             "logits": {0: "batch", 1: "seq"}})
    # Traced with a past of 3 and 2 new tokens: the general path, valid for past 0 and new 1 too.
    past = [torch.randn(2, dims["kv_heads"], 3, dims["head_dim"], generator=g).to(dtype) for _ in range(2 * layers)]
    emb2 = torch.randn(2, 2, d, generator=g).to(dtype)
    axes: dict[str, dict[int, str]] = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total_seq"},
                                       "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past_seq"} for n in past_names(layers)})
    axes.update({n: {0: "batch", 2: "total_seq"} for n in past_names(layers, "present")})
    written += _export_graph(_LowerWithPast(traced, layers), (emb2, torch.ones(2, 5, dtype=torch.int64), *past),
                             out / files["graph_with_past"], ["inputs_embeds", "attention_mask", *past_names(layers)],
                             ["logits", *past_names(layers, "present")], axes)
    return files, written


def _export_graph(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                  output_names: list[str], dynamic_axes: dict[str, dict[int, str]]) -> list[str]:
    """Trace into a scratch folder (over 2 GiB the tracer writes one file per weight there),
    then save once through ``finalize`` + ``save_model``. Returns the file names written."""
    import tempfile

    import onnx

    from prism_deploy.onnx_io import OPSET, finalize, save_model

    # The exporter puts the module back in the training mode it found it in: a fresh wrapper is
    # in training mode, which would switch on the wrapped model's dropout for the validation
    # that follows. Wrappers are exported in eval mode.
    module.eval()
    with tempfile.TemporaryDirectory(prefix=".trace-", dir=path.parent) as scratch:
        traced = Path(scratch) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            # The tracer warns about every Python-side shape test it freezes; the validation
            # step is what checks that the frozen branches hold for other shapes.
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module, args, str(traced), input_names=input_names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
            except Exception as exc:  # the tracer raises many types; the CLI promises one line
                raise PrismInputError(f"{path.name}: torch.onnx.export cannot trace this model "
                                      f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})") from exc
        model = onnx.load(str(traced))  # pulls external weights into memory before the folder goes
    return [p.name for p in save_model(finalize(model), path)]


def _io_description(role: str, layers: int) -> dict[str, Any]:
    if role == "upper":
        return {"inputs": {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]},
                "outputs": {"hidden": ["batch", "seq", "hidden"]}}
    return {
        "inputs": {"inputs_embeds": ["batch", "seq", "hidden"], "attention_mask": ["batch", "seq"]},
        "outputs": {"logits": ["batch", "seq", "vocab"]},
        "with_past": {
            "inputs": {"inputs_embeds": ["batch", "seq", "hidden"], "attention_mask": ["batch", "total_seq"],
                       **{n: ["batch", "kv_heads", "past_seq", "head_dim"] for n in past_names(layers)}},
            "outputs": {"logits": ["batch", "seq", "vocab"],
                        **{n: ["batch", "kv_heads", "total_seq", "head_dim"] for n in past_names(layers, "present")}},
        },
    }


# -- validation ---------------------------------------------------------------------------------------


def compare(got: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None, *, logits: bool = False,
            tie_gap: float = 1e-4) -> dict[str, float]:
    """Error figures of ``got`` vs ``ref`` ([..., features]) over the tokens where ``mask`` is 1."""
    g = np.asarray(got, dtype=np.float64).reshape(-1, got.shape[-1])
    r = np.asarray(ref, dtype=np.float64).reshape(-1, ref.shape[-1])
    if mask is not None:
        keep = np.asarray(mask).reshape(-1).astype(bool)
        g, r = g[keep], r[keep]
    diff = g - r
    gn, rn = np.linalg.norm(g, axis=-1), np.linalg.norm(r, axis=-1)
    # Cosine says nothing about (near-)zero vectors (a padding-id embedding row is all zeros):
    # those tokens are left to max_abs / rel_l2.
    sized = rn > 1e-6 * max(float(rn.max(initial=0.0)), 1e-30)
    cos = (g * r).sum(-1)[sized] / np.maximum(gn[sized] * rn[sized], 1e-30)
    fig = {"tokens": int(r.shape[0]), "max_abs": float(np.abs(diff).max()),
           "rel_l2": float(np.linalg.norm(diff) / max(float(np.linalg.norm(r)), 1e-30)),
           "min_cosine": float(cos.min()) if cos.size else 1.0}
    if logits:
        top2 = np.sort(r, axis=-1)[:, -2:]
        gap = top2[:, 1] - top2[:, 0]
        ambiguous = gap <= tie_gap * max(np.abs(r).max(), 1e-30)
        agree = g.argmax(-1) == r.argmax(-1)
        clear = ~ambiguous
        fig["top1"] = float(agree[clear].mean()) if clear.any() else 1.0
        fig["top1_all"] = float(agree.mean())
        fig["ambiguous"] = int(ambiguous.sum())
        kl = _kl(r, g)  # KL(reference || got) of the next-token distributions, nats
        fig["kl_mean"], fig["kl_max"] = float(kl.mean()), float(kl.max())
    return fig


def _kl(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(got)) per row, float64 (the same as parity's ``kl_divergence``)."""
    log_p = ref - ref.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = got - got.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)


def _check(name: str, fig: dict[str, float], tol: dict[str, float], precision: str) -> None:
    bad = []
    if not fig["rel_l2"] <= tol["rel_l2"]:
        bad.append(f"rel_l2 {fig['rel_l2']:.3g} > {tol['rel_l2']:.3g}")
    if not fig["min_cosine"] >= tol["min_cosine"]:
        bad.append(f"min cosine {fig['min_cosine']:.6f} < {tol['min_cosine']}")
    if "top1" in fig and not fig["top1"] >= tol["top1"]:
        bad.append(f"top-1 agreement {fig['top1']:.3f} < {tol['top1']}")
    if "kl_max" in fig and "kl_max" in tol and not fig["kl_max"] <= tol["kl_max"]:
        bad.append(f"KL max {fig['kl_max']:.3g} > {tol['kl_max']:.3g} nats")
    if bad:
        raise CheckFailed(f"{name} ({precision}) diverges from the transformers model: {'; '.join(bad)} "
                          f"(max abs {fig['max_abs']:.3g})")


def _validation_masks(batch_seq: list[tuple[int, int]]) -> list[np.ndarray]:
    masks = []
    for b, s in batch_seq:
        m = np.ones((b, s), dtype=np.int64)
        if b > 1 and s > 2:
            m[-1, : s // 3] = 0  # one left-padded row, as batched generation makes
        masks.append(m)
    return masks


def _shapes(max_seq: int) -> list[tuple[int, int]]:
    return [(2, min(max_seq, 11)), (1, 1), (3, min(max_seq, 5))]


def _validate_upper(reference: Any, out: Path, files: dict[str, str], precision: str, max_seq: int, seed: int) -> dict[str, Any]:
    from prism_deploy.ort_session import make_session

    tol = tolerances(precision)
    session = make_session(out / files["graph"], "cpu")
    rng = np.random.default_rng(seed)
    figs = []
    for mask in _validation_masks(_shapes(max_seq)):
        ids = rng.integers(0, reference.config.vocab_size, size=mask.shape, dtype=np.int64)
        got = session.run(["hidden"], {"input_ids": ids, "attention_mask": mask})[0]
        with torch.no_grad():
            ref = hf.final_hidden(reference, torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        figs.append(compare(got, ref, mask))
    fig = _merge(figs)
    _check("upper graph `hidden`", fig, tol, precision)
    return {"provider": "cpu", "tolerances": tol, "hidden": fig}


def _validate_lower(reference: Any, out: Path, files: dict[str, str], precision: str, max_seq: int, seed: int) -> dict[str, Any]:
    from prism_deploy.ort_session import make_session

    tol = tolerances(precision)
    d = hf.cache_dims(reference.config)
    io_dtype = np.float16 if precision == "fp16" else np.float32
    rng = np.random.default_rng(seed)
    # Embedding-scale inputs: rows of the model's own embedding matrix plus noise, so the
    # validation sees activations of the size real adapted prefixes have.
    table = hf.input_embedding_matrix(reference)
    scale = float(table.std()) or 1.0

    def random_embeds(b: int, s: int) -> np.ndarray:
        rows = table[rng.integers(0, table.shape[0], size=(b, s))]
        return (rows + rng.normal(0, scale, size=rows.shape)).astype(np.float32)

    plain = make_session(out / files["graph"], "cpu")
    figs = []
    for mask in _validation_masks(_shapes(max_seq)):
        emb = random_embeds(*mask.shape)
        got = plain.run(["logits"], {"inputs_embeds": emb.astype(io_dtype), "attention_mask": mask})[0]
        with torch.no_grad():
            ref, _ = hf.causal_lm_forward(reference, inputs_embeds=torch.from_numpy(emb), attention_mask=torch.from_numpy(mask))
        figs.append(compare(got, ref.numpy(), mask, logits=True, tie_gap=tol["tie_gap"]))
    fig_plain = _merge(figs)
    _check("lower graph `logits`", fig_plain, tol, precision)

    # KV graph: prefill with an empty past, then two steps of 1 and 2 new tokens; each step's
    # logits against transformers run on the whole sequence so far.
    past_graph = make_session(out / files["graph_with_past"], "cpu")
    names = past_names(d["layers"])
    figs = []
    b, prefix = 2, min(max_seq - 3, 6)
    emb_all = random_embeds(b, prefix + 3)
    mask_all = np.ones((b, prefix + 3), dtype=np.int64)
    mask_all[1, :2] = 0
    past = {n: np.zeros((b, d["kv_heads"], 0, d["head_dim"]), dtype=io_dtype) for n in names}
    start = 0
    for stop in (prefix, prefix + 1, prefix + 3):
        feeds = {"inputs_embeds": emb_all[:, start:stop].astype(io_dtype), "attention_mask": mask_all[:, :stop], **past}
        outs = past_graph.run(None, feeds)
        past = dict(zip(names, outs[1:]))
        with torch.no_grad():
            ref, _ = hf.causal_lm_forward(reference, inputs_embeds=torch.from_numpy(emb_all[:, :stop]),
                                          attention_mask=torch.from_numpy(mask_all[:, :stop]))
        figs.append(compare(outs[0], ref.numpy()[:, start:stop], mask_all[:, start:stop], logits=True, tie_gap=tol["tie_gap"]))
        start = stop
    fig_past = _merge(figs)
    _check("lower KV-cache graph `logits`", fig_past, tol, precision)
    return {"provider": "cpu", "tolerances": tol, "logits": fig_plain, "logits_with_past": fig_past}


def _merge(figs: list[dict[str, float]]) -> dict[str, float]:
    """Worst case over several validation shapes (top-1 weighted by token count)."""
    out: dict[str, float] = {"tokens": sum(f["tokens"] for f in figs),
                             "max_abs": max(f["max_abs"] for f in figs), "rel_l2": max(f["rel_l2"] for f in figs),
                             "min_cosine": min(f["min_cosine"] for f in figs)}
    if "top1" in figs[0]:
        out["top1"] = min(f["top1"] for f in figs)
        out["top1_all"] = sum(f["top1_all"] * f["tokens"] for f in figs) / out["tokens"]
        out["ambiguous"] = sum(f["ambiguous"] for f in figs)
        out["kl_max"] = max(f["kl_max"] for f in figs)
        out["kl_mean"] = sum(f["kl_mean"] * f["tokens"] for f in figs) / out["tokens"]
    return out


def _eos_token_id(model: Any) -> int | None:
    """The id that ends generation (the generation config's first, else the config's), if any."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is not None:
            return int(eos)
    return None



def _opset() -> dict[str, int]:
    from prism_deploy.onnx_io import IR_VERSION, OPSET

    return {"opset": OPSET, "ir_version": IR_VERSION}


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    from prism_deploy import __version__

    return {"prism_deploy": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
