"""An exported model folder's graphs against the float32 transformers model, reference first.

Two passes: :func:`expect` runs the PyTorch model on every input the checks feed (random
inputs, a KV-cache sequence, the held-out real text) and keeps only those inputs and outputs;
the caller then lets the model go, and :func:`check` runs the exported graphs on the same
inputs, one ONNX Runtime session at a time, and compares. Holding the model beside the graphs'
sessions took model L's int8 export (3.34 GB of float weights) to 1.60x its weights, over the
1.5x that issue 28 asks of an export (docs/quantized-models.md).

Tolerances: :func:`prism_deploy.core.tolerances.model_export` (relative L2 over the real tokens,
the smallest per-token cosine, top-1 agreement of logits on tokens whose reference top-1/top-2
gap is clear) and, on real text, :func:`~prism_deploy.core.tolerances.real_text`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism_deploy.core import tolerances
from prism_deploy.core.errors import CheckFailed, PrismInputError
from prism_deploy.core.metrics import compare, compare_logits, merge
from prism_deploy.core.precision import ModelPrecision
from prism_deploy.format.model_folder import past_names
from prism_deploy.models import hf

REAL_WINDOWS = 4  # windows of REAL_WINDOW tokens of the corpus' held-out part: 256 tokens
REAL_WINDOW = 64


@dataclass
class Expected:
    """What the checks feed the graphs and what the float32 model gave for it."""

    role: str
    dims: dict[str, int]
    # the plain graph: (input, mask, reference output); input: token ids or float32 embeddings
    plain: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    # a last model's KV-cache graph: embeddings, mask and the reference logits of each step
    kv: dict[str, Any] | None = None
    # real text (None without a tokenizer): ids, reference logits, and for a first or middle
    # model its reference hidden states and LM head (kept: it turns the graph's states into logits)
    real: dict[str, Any] | None = None


def check_figures(
    name: str, fig: dict[str, Any], tol: tolerances.Tolerances, precision: ModelPrecision, gate: bool = True
) -> None:
    """Raise ``CheckFailed`` for figures outside ``tol``; with ``gate`` off, note them in ``fig``."""
    bad = tol.failures(fig)
    if bad and not gate:
        fig["outside_bounds"] = bad
        return
    if bad:
        raise CheckFailed(
            f"{name} ({precision}) diverges from the transformers model: {'; '.join(bad)} "
            f"(max abs {fig['max_abs']:.3g})"
        )


def validation_masks(batch_seq: list[tuple[int, int]]) -> list[np.ndarray]:
    masks = []
    for b, s in batch_seq:
        m = np.ones((b, s), dtype=np.int64)
        if b > 1 and s > 2:
            m[-1, : s // 3] = 0  # one left-padded row, as batched generation makes
        masks.append(m)
    return masks


def shapes(max_seq: int) -> list[tuple[int, int]]:
    return [(2, min(max_seq, 11)), (1, 1), (3, min(max_seq, 5))]


def embedding_scale_inputs(reference: Any, seed: int) -> Any:
    """Random inputs the size real adapted prefixes have: rows of the model's own embedding
    matrix plus noise of the same scale."""
    rng = np.random.default_rng(seed)
    table = hf.input_embedding_matrix(reference)
    scale = float(table.std()) or 1.0

    def random_embeds(b: int, s: int) -> np.ndarray:
        rows = table[rng.integers(0, table.shape[0], size=(b, s))]
        return (rows + rng.normal(0, scale, size=rows.shape)).astype(np.float32)

    return random_embeds


# -- pass 1: the PyTorch model ------------------------------------------------------------------------


def expect(
    reference: Any,
    role: str,
    max_seq: int,
    seed: int,
    hf_dir: Any = None,
    text_corpus: Any = None,
    *,
    kv: bool = True,
) -> Expected:
    """Every input the checks of a ``role`` folder feed, with the float32 model's outputs;
    real text where ``hf_dir`` has a tokenizer and ``text_corpus`` is given; ``kv``: a last
    model's KV-cache sequence too."""
    dims = hf.cache_dims(reference.config)
    expected = Expected(role, dims)
    masks = validation_masks(shapes(max_seq))
    with torch.no_grad():
        if role == "first":
            rng = np.random.default_rng(seed)
            for mask in masks:
                ids = rng.integers(0, reference.config.vocab_size, size=mask.shape, dtype=np.int64)
                ref = hf.final_hidden(reference, torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
                expected.plain.append((ids, mask, ref))
        else:
            random_embeds = embedding_scale_inputs(reference, seed)
            for mask in masks:
                emb = random_embeds(*mask.shape)
                tmask, temb = torch.from_numpy(mask), torch.from_numpy(emb)
                if role == "middle":
                    ref = hf.final_hidden(reference, None, tmask, inputs_embeds=temb).numpy()
                else:
                    ref = hf.causal_lm_forward(reference, inputs_embeds=temb, attention_mask=tmask)[0].numpy()
                expected.plain.append((emb, mask, ref))
            if role == "last" and kv:
                expected.kv = _expect_kv(reference, random_embeds, max_seq)
    if text_corpus is not None:
        expected.real = _expect_real_text(hf_dir, reference, role, text_corpus, max_seq)
    return expected


def _expect_kv(reference: Any, random_embeds: Any, max_seq: int) -> dict[str, Any]:
    """A prefill with an empty past, then steps of 1 and 2 new tokens; each step's reference
    logits from transformers run on the whole sequence so far."""
    b, prefix = 2, min(max_seq - 3, 6)
    emb_all = random_embeds(b, prefix + 3)
    mask_all = np.ones((b, prefix + 3), dtype=np.int64)
    mask_all[1, :2] = 0
    stops, refs, start = [prefix, prefix + 1, prefix + 3], [], 0
    for stop in stops:
        ref, _ = hf.causal_lm_forward(
            reference,
            inputs_embeds=torch.from_numpy(emb_all[:, :stop]),
            attention_mask=torch.from_numpy(mask_all[:, :stop]),
        )
        refs.append(ref.numpy()[:, start:stop])
        start = stop
    return {"embeds": emb_all, "mask": mask_all, "stops": stops, "logits": refs}


def _expect_real_text(hf_dir: Any, reference: Any, role: str, text_corpus: Any, max_seq: int) -> dict[str, Any] | None:
    """Token windows of the held-out text under the model's own tokenizer, the reference's
    logits on them, and whether the float model predicts that text (its perplexity under a tenth
    of the vocabulary's: a model with random weights scores about the vocabulary size). None
    without a tokenizer."""
    from prism_deploy.core import corpus
    from prism_deploy.core.metrics import perplexity
    from prism_deploy.models.tokenizers import load_tokenizer

    try:
        tokenizer = load_tokenizer(hf_dir)
    except PrismInputError:
        return None  # a folder without a tokenizer (the tests' random models): random inputs only
    length = min(REAL_WINDOW, max_seq)
    windows = corpus.token_windows(tokenizer, text_corpus.text("held_out"), length, REAL_WINDOWS)
    if not windows:
        windows = corpus.token_windows(tokenizer, text_corpus.text("calibration"), length, REAL_WINDOWS)
    vocab = int(reference.get_input_embeddings().weight.shape[0])
    windows = [w for w in windows if max(w) < vocab]
    if not windows:
        return None
    ids = np.asarray(windows, dtype=np.int64)
    mask = torch.ones(ids.shape, dtype=torch.int64)
    head = reference.get_output_embeddings()
    with torch.no_grad():
        hidden = hf.final_hidden(reference, torch.from_numpy(ids), mask).numpy()
    logits = _head(head, hidden)
    ppl = float(np.mean([perplexity(logits[i], ids[i]) for i in range(len(ids))]))
    real = {
        "ids": ids,
        "corpus": text_corpus.describe(),
        "part": "held_out",
        "reference_logits": logits,
        "language_model": bool(ppl < 0.1 * vocab),
    }
    if role == "first":
        real.update(hidden=hidden, head=head)
    else:
        real["embeds"] = hf.input_embedding_matrix(reference)[ids].astype(np.float32)
        if role == "middle":
            real.update(hidden=hidden, head=head)
    return real


def _head(head: Any, hidden: np.ndarray) -> np.ndarray:
    """The reference's LM head applied to final hidden states (after the final norm)."""
    with torch.no_grad():
        return head(torch.from_numpy(np.asarray(hidden, np.float32))).float().numpy()


# -- pass 2: the exported graphs ----------------------------------------------------------------------


def check(
    expected: Expected, out: Path, files: dict[str, str], precision: ModelPrecision, gate_random: bool = True
) -> dict[str, Any]:
    """The folder's graphs on the expected inputs, one session at a time; raises ``CheckFailed``
    where they diverge beyond the precision's tolerances. Returns the manifest's validation."""
    from prism_deploy.core.ort_session import make_session

    role = expected.role
    tol = tolerances.model_export(precision)
    io_dtype = precision.float_dtype
    output = "logits" if role == "last" else "hidden"
    session = make_session(out / files["graph"], "cpu")
    figs = []
    for x, mask, ref in expected.plain:
        feeds = {"input_ids": x} if role == "first" else {"inputs_embeds": x.astype(io_dtype)}
        got = session.run([output], {**feeds, "attention_mask": mask})[0]
        figs.append(compare_logits(got, ref, mask, tie_gap=tol.tie_gap) if role == "last" else compare(got, ref, mask))
    del session
    fig = merge(figs)
    check_figures(f"{role} graph `{output}`", fig, tol, precision, gate_random)
    validation: dict[str, Any] = {"provider": "cpu", "tolerances": tol.to_json(), output: fig}
    if expected.kv is not None:
        validation["logits_with_past"] = _check_kv(expected, out / files["graph_with_past"], precision, gate_random)
    validation["random_inputs"] = "gated" if gate_random else "reported (real text gates a language model)"
    if expected.real is not None:
        validation["real_text"] = _check_real_text(expected, out, files, precision)
    return validation


def _check_kv(expected: Expected, graph: Path, precision: ModelPrecision, gate: bool) -> dict[str, Any]:
    from prism_deploy.core.ort_session import make_session

    assert expected.kv is not None
    tol = tolerances.model_export(precision)
    io_dtype = precision.float_dtype
    d, kv = expected.dims, expected.kv
    past_graph = make_session(graph, "cpu")
    names = past_names(d["layers"])
    emb_all, mask_all = kv["embeds"], kv["mask"]
    past = {n: np.zeros((emb_all.shape[0], d["kv_heads"], 0, d["head_dim"]), dtype=io_dtype) for n in names}
    figs, start = [], 0
    for stop, ref in zip(kv["stops"], kv["logits"], strict=True):
        feeds = {"inputs_embeds": emb_all[:, start:stop].astype(io_dtype), "attention_mask": mask_all[:, :stop], **past}
        outs = past_graph.run(None, feeds)
        past = dict(zip(names, outs[1:]))
        figs.append(compare_logits(outs[0], ref, mask_all[:, start:stop], tie_gap=tol.tie_gap))
        start = stop
    fig = merge(figs)
    check_figures("last KV-cache graph `logits`", fig, tol, precision, gate)
    return fig


def _check_real_text(expected: Expected, out: Path, files: dict[str, str], precision: ModelPrecision) -> dict[str, Any]:
    """The exported graph on real text against the float32 model: its output's figures and,
    through the model's LM head for a first or middle graph, next-token agreement and perplexity."""
    from prism_deploy.core.metrics import next_token_quality
    from prism_deploy.core.ort_session import make_session

    role, real = expected.role, expected.real
    assert real is not None
    ids = real["ids"]
    mask = np.ones(ids.shape, dtype=np.int64)
    io_dtype = precision.float_dtype
    session = make_session(out / files["graph"], "cpu")
    if role == "first":
        got = session.run(["hidden"], {"input_ids": ids, "attention_mask": mask})[0]
    else:
        name = "logits" if role == "last" else "hidden"
        got = session.run([name], {"inputs_embeds": real["embeds"].astype(io_dtype), "attention_mask": mask})[0]
    del session  # before the decoding graph's session opens
    got = np.asarray(got, np.float32)
    ref_logits = real["reference_logits"]
    tol = tolerances.real_text(precision) if real["language_model"] else tolerances.model_export(precision)
    tie_gap = tolerances.model_export(precision).tie_gap
    if role == "last":
        got_logits = got
        fig = compare_logits(got_logits, ref_logits, mask, tie_gap=tie_gap)
    else:
        got_logits = _head(real["head"], got)
        fig = compare(got, real["hidden"], mask)
    quality = next_token_quality(list(got_logits), list(ref_logits), list(ids))
    # a model that does not predict the text (random weights, an encoder without its LM head):
    # its outputs are checked, its perplexity means nothing
    bounds = (
        tol
        if real["language_model"]
        else tol.replace(agreement_min=None, perplexity_ratio_max=None, top1_min=None, kl_max=None)
    )
    _check_quality(f"{role} graph", fig, quality, bounds, precision)
    result = {
        "provider": "cpu",
        "corpus": real["corpus"],
        "part": real["part"],
        "windows": int(ids.shape[0]),
        "window_tokens": int(ids.shape[1]),
        "language_model": real["language_model"],
        "tolerances": bounds.to_json(),
        "output": fig,
        "next_token": quality,
    }
    if role == "last" and "graph_with_past" in files:
        # the decoding graph on the same text: a prefill of three quarters of each window, then
        # the rest read against that cache
        d = expected.dims
        names = past_names(d["layers"])
        decoder = make_session(out / files["graph_with_past"], "cpu")
        emb = real["embeds"].astype(io_dtype)
        cut = max(1, ids.shape[1] * 3 // 4)
        past = {n: np.zeros((ids.shape[0], d["kv_heads"], 0, d["head_dim"]), dtype=io_dtype) for n in names}
        head = decoder.run(None, {"inputs_embeds": emb[:, :cut], "attention_mask": mask[:, :cut], **past})
        tail = decoder.run(None, {"inputs_embeds": emb[:, cut:], "attention_mask": mask, **dict(zip(names, head[1:]))})
        got_kv = np.concatenate([np.asarray(head[0], np.float32), np.asarray(tail[0], np.float32)], axis=1)
        fig_kv = compare_logits(got_kv, ref_logits, mask, tie_gap=tie_gap)
        quality_kv = next_token_quality(list(got_kv), list(ref_logits), list(ids))
        _check_quality("last KV-cache graph", fig_kv, quality_kv, bounds, precision)
        result["output_with_past"] = fig_kv
        result["next_token_with_past"] = quality_kv
    return result


def _check_quality(
    name: str, fig: dict[str, Any], quality: dict[str, Any], bounds: tolerances.Tolerances, precision: ModelPrecision
) -> None:
    bad = bounds.failures({**fig, **{k: v for k, v in quality.items() if k != "tokens"}})
    if bad:
        raise CheckFailed(f"{name} on real text ({precision}) diverges from the transformers model: {'; '.join(bad)}")
