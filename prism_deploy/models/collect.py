"""Paired activations for fitting an adapter: X = model A hidden states, Z = model B input embeddings.

Texts: one per non-empty line of the text file. Model A reads each text as the pipeline will
(its tokenizer's defaults, special tokens included) and X is its final hidden state after the
norm. Z is model B's input-embedding rows for the same text under model B's tokenizer, without
special tokens (Z targets the text, not B's framing of it).

Pooling (``pool``):
- ``last``: one row per text: A's hidden at its last text token, B's embedding of its last text token.
- ``mean``: one row per text: the mean over text tokens on each side.
- ``tokens``: one row per model A text token (the pipeline produces one adapted embedding per A
  position, so every row is a situation the deployed adapter meets). Alignment by character
  offsets: A token i (char span [s, e)) is paired with the B token whose span contains its last
  character (for a whitespace token whose span the tokenizer trimmed to (s, s), the character
  s-1). Model A is causal, so its hidden state at token i has read the text up to e-1 and
  no further; the B token holding that character is the one being spelled at that moment. If no
  B token covers e-1 (a character B's tokenizer drops), the last B token starting at or before it
  is used. Special tokens (the tokenizer's special-tokens mask) are left out on both sides. Both
  tokenizers must be fast tokenizers (offsets); otherwise ``tokens`` is refused.
In ``last`` and ``mean``, "text tokens" are the real tokens that are not special tokens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism_deploy.core.errors import PrismInputError
from prism_deploy.models import hf
from prism_deploy.models.tokenizers import load_tokenizer

POOLS = ("last", "mean", "tokens")


def read_texts(path: str | os.PathLike[str]) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise PrismInputError(f"{path}: no such text file")
    try:
        texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise PrismInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    texts = [t for t in texts if t]
    if not texts:
        raise PrismInputError(f"{path}: no non-empty lines (one text per line is expected)")
    return texts


def char_span(start: int, end: int) -> tuple[int, int]:
    """A token's characters. Offset trimming (``trim_offsets``) empties the span of a
    whitespace-only token to ``(s, s)``; its character is the one just before, ``[s-1, s)``."""
    return (start, end) if end > start else (max(start - 1, 0), max(start, 1) if start > 0 else 0)


def align_by_offsets(
    a_offsets: list[tuple[int, int] | None], b_offsets: list[tuple[int, int] | None]
) -> list[tuple[int, int]]:
    """(A index, B index) pairs: each A token -> the B token holding the A token's last character.

    ``None`` marks a special token (no characters), left out on both sides. Spans of one
    tokenizer do not overlap and come in order, so "the B token containing char c, else the
    last one starting before c" is one rule: the last B token starting at or before c.
    """
    import bisect

    b_spans = [
        (char_span(*o)[0], j) for j, o in enumerate(b_offsets) if o is not None and char_span(*o)[1] > char_span(*o)[0]
    ]
    if not b_spans:
        return []
    starts = [s for s, _ in b_spans]
    pairs = []
    for i, o in enumerate(a_offsets):
        if o is None:
            continue
        s, e = char_span(*o)
        if e <= s:
            continue
        k = max(bisect.bisect_right(starts, e - 1) - 1, 0)
        pairs.append((i, b_spans[k][1]))
    return pairs


def collect_pairs(
    model_a_dir: str | os.PathLike[str],
    model_b_dir: str | os.PathLike[str],
    texts: list[str],
    *,
    pool: str = "last",
    max_seq: int = 512,
    batch: int = 8,
    tokenizer_a: str | None = None,
    tokenizer_b: str | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(X [n, d_A], Z [n, d_B], info) for ``texts``; tokenizers default to the model folders."""
    if pool not in POOLS:
        raise PrismInputError(f"--pool: {pool!r} is not one of {', '.join(POOLS)}")
    if max_seq < 1 or batch < 1:
        raise PrismInputError("--max-seq and --batch must be at least 1")
    tok_a = load_tokenizer(tokenizer_a or model_a_dir)
    tok_b = load_tokenizer(tokenizer_b or model_b_dir)
    offsets = bool(getattr(tok_a, "is_fast", False) and getattr(tok_b, "is_fast", False))
    if pool == "tokens" and not offsets:
        raise PrismInputError("--pool tokens needs fast tokenizers (character offsets) for both models")
    model_a = hf.load_causal_lm(model_a_dir, uses_head=False)  # its final hidden states only
    embed_b = hf.load_input_embedding_matrix(model_b_dir)
    if tok_a.pad_token_id is None:
        tok_a.pad_token = tok_a.eos_token or tok_a.unk_token or tok_a.convert_ids_to_tokens(0)
    tok_a.padding_side = "right"  # causal: right padding leaves the real tokens' states untouched

    from tqdm.auto import tqdm

    xs: list[np.ndarray] = []
    zs: list[np.ndarray] = []
    skipped = 0
    truncated = 0
    for start in tqdm(range(0, len(texts), batch), desc="collect", unit="batch", disable=None if progress else True):
        chunk = texts[start : start + batch]
        enc_a = tok_a(
            chunk,
            padding=True,
            truncation=True,
            max_length=max_seq,
            return_tensors="pt",
            return_offsets_mapping=offsets,
            return_special_tokens_mask=True,
        )
        enc_b = tok_b(
            chunk,
            add_special_tokens=False,
            truncation=True,
            max_length=max_seq,
            return_offsets_mapping=offsets,
            return_special_tokens_mask=True,
        )
        with torch.no_grad():
            hidden = hf.final_hidden(model_a, enc_a["input_ids"], enc_a["attention_mask"]).float().numpy()
        for r in range(len(chunk)):
            n_a = int(enc_a["attention_mask"][r].sum())
            truncated += int(n_a >= max_seq)
            ids_b = list(enc_b["input_ids"][r])
            special_a = [bool(v) for v in enc_a["special_tokens_mask"][r][:n_a]]
            special_b = [bool(v) for v in enc_b["special_tokens_mask"][r]]
            a_rows = [i for i in range(n_a) if not special_a[i]]
            b_rows = [j for j in range(len(ids_b)) if not special_b[j]]
            if not a_rows or not b_rows:
                skipped += 1
                continue
            h = hidden[r, :n_a]
            if pool == "tokens":
                a_off: list[tuple[int, int] | None] = [
                    None if special_a[i] else (int(o[0]), int(o[1]))
                    for i, o in enumerate(enc_a["offset_mapping"][r][:n_a])
                ]
                b_off: list[tuple[int, int] | None] = [
                    None if special_b[j] else (int(o[0]), int(o[1])) for j, o in enumerate(enc_b["offset_mapping"][r])
                ]
                pairs = align_by_offsets(a_off, b_off)
                if not pairs:
                    skipped += 1
                    continue
                xs.append(h[[i for i, _ in pairs]])
                zs.append(embed_b[[ids_b[j] for _, j in pairs]])
                continue
            emb = embed_b[[ids_b[j] for j in b_rows]]
            if pool == "last":
                xs.append(h[a_rows[-1]][None])
                zs.append(emb[-1][None])
            else:
                xs.append(h[a_rows].mean(0, keepdims=True))
                zs.append(emb.mean(0, keepdims=True))
    if not xs:
        raise PrismInputError("no pairs: every text was empty after tokenization")
    x = np.concatenate(xs).astype(np.float32)
    z = np.concatenate(zs).astype(np.float32)
    info = {
        "pool": pool,
        "texts": len(texts),
        "skipped_texts": skipped,
        "truncated_texts": truncated,
        "rows": int(x.shape[0]),
        "d_a": int(x.shape[1]),
        "d_b": int(z.shape[1]),
        "max_seq": max_seq,
        "model_a": str(Path(model_a_dir).resolve()),
        "model_b": str(Path(model_b_dir).resolve()),
    }
    return x, z, info


def save_pairs(path: str | os.PathLike[str], x: np.ndarray, z: np.ndarray, info: dict[str, Any]) -> None:
    """Write ``X`` and ``Z`` to one safetensors file atomically (metadata: the collect settings)."""
    from prism_deploy.core.fsutil import atomic_output
    from prism_deploy.format.adapter_file import save_safetensors

    with atomic_output(path) as tmp:
        save_safetensors(
            {"X": np.ascontiguousarray(x), "Z": np.ascontiguousarray(z)}, tmp, {k: str(v) for k, v in info.items()}
        )


def collect_fusion_pairs(
    input_dirs: Sequence[str | os.PathLike[str]],
    model_b_dir: str | os.PathLike[str],
    texts: list[str],
    *,
    pool: str = "tokens",
    max_seq: int = 512,
    batch: int = 8,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(X [n, sum of the inputs' widths], Z [n, d_B], info) for a fusion adapter: the inputs'
    hidden states side by side, in ``input_dirs`` order, against model B's embeddings.

    Aligned by the text's characters as :func:`collect_pairs` aligns: with ``tokens``, one row per
    text token of the first input; every other input's state is that of its token holding the
    same last character, and Z is model B's token holding it (a row any side cannot pair is
    left out). ``last`` / ``mean`` pool each input as :func:`collect_pairs` does."""
    if len(input_dirs) < 2:
        raise PrismInputError("a fusion adapter has two or more inputs")
    if pool not in POOLS:
        raise PrismInputError(f"--pool: {pool!r} is not one of {', '.join(POOLS)}")
    per_input = []
    for d in input_dirs:  # each input against B, as collect_pairs pairs one model
        per_input.append(_token_states(d, texts, max_seq=max_seq, batch=batch, progress=progress))
    tok_b = load_tokenizer(model_b_dir)
    embed_b = hf.load_input_embedding_matrix(model_b_dir)
    xs: list[np.ndarray] = []
    zs: list[np.ndarray] = []
    skipped = 0
    for t, text in enumerate(texts):
        enc_b = tok_b(
            text,
            add_special_tokens=False,
            truncation=True,
            max_length=max_seq,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        ids_b = list(enc_b["input_ids"])
        b_off = [
            None if sp else (int(o[0]), int(o[1]))
            for o, sp in zip(enc_b["offset_mapping"], enc_b["special_tokens_mask"])
        ]
        states = [s for s in (p[t] for p in per_input) if s is not None]  # (hidden [n, d], offsets) per input
        if len(states) < len(per_input) or not any(o is not None for o in b_off):
            skipped += 1
            continue
        if pool == "tokens":
            first_h, first_off = states[0]
            to_b = dict(align_by_offsets(first_off, b_off))
            others = [dict(align_by_offsets(first_off, off)) for _, off in states[1:]]
            rows = [i for i in range(len(first_off)) if i in to_b and all(i in o for o in others)]
            if not rows:
                skipped += 1
                continue
            xs.append(
                np.concatenate(
                    [first_h[rows]] + [h[[o[i] for i in rows]] for (h, _), o in zip(states[1:], others)], axis=1
                )
            )
            zs.append(embed_b[[ids_b[to_b[i]] for i in rows]])
            continue
        real_b = [ids_b[j] for j, o in enumerate(b_off) if o is not None]
        picks = []
        for h, off in states:
            real = [i for i, o in enumerate(off) if o is not None]
            picks.append(h[real[-1]] if pool == "last" else h[real].mean(0))
        xs.append(np.concatenate(picks)[None])
        zs.append((embed_b[real_b[-1]] if pool == "last" else embed_b[real_b].mean(0))[None])
    if not xs:
        raise PrismInputError("no pairs: no text gave tokens every model could align")
    x = np.concatenate(xs).astype(np.float32)
    z = np.concatenate(zs).astype(np.float32)
    info = {
        "pool": pool,
        "texts": len(texts),
        "skipped_texts": skipped,
        "truncated_texts": 0,
        "rows": int(x.shape[0]),
        "d_a": int(x.shape[1]),
        "d_b": int(z.shape[1]),
        "max_seq": max_seq,
        "inputs": ",".join(str(Path(d).resolve()) for d in input_dirs),
        "model_b": str(Path(model_b_dir).resolve()),
    }
    return x, z, info


def _token_states(
    model_dir: str | os.PathLike[str], texts: list[str], *, max_seq: int, batch: int, progress: bool
) -> list[tuple[np.ndarray, list[tuple[int, int] | None]] | None]:
    """Per text: the model's final hidden states over its own tokens [n, d] (tokenized as the
    pipeline does) and each token's character offsets (None for a special token); None for a
    text with no real token."""
    tok = load_tokenizer(model_dir)
    if not getattr(tok, "is_fast", False):  # character alignment needs offsets
        raise PrismInputError(f"{model_dir}: a fusion's pairs need a fast tokenizer (character offsets)")
    model = hf.load_causal_lm(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token or tok.convert_ids_to_tokens(0)
    tok.padding_side = "right"
    from tqdm.auto import tqdm

    out: list[tuple[np.ndarray, list[tuple[int, int] | None]] | None] = []
    for start in tqdm(
        range(0, len(texts), batch),
        desc=f"collect {Path(model_dir).name}",
        unit="batch",
        disable=None if progress else True,
    ):
        chunk = texts[start : start + batch]
        enc = tok(
            chunk,
            padding=True,
            truncation=True,
            max_length=max_seq,
            return_tensors="pt",
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        with torch.no_grad():
            hidden = hf.final_hidden(model, enc["input_ids"], enc["attention_mask"]).float().numpy()
        for r in range(len(chunk)):
            n = int(enc["attention_mask"][r].sum())
            special = [bool(v) for v in enc["special_tokens_mask"][r][:n]]
            offsets = [
                None if special[i] else (int(o[0]), int(o[1])) for i, o in enumerate(enc["offset_mapping"][r][:n])
            ]
            out.append((hidden[r, :n], offsets) if any(o is not None for o in offsets) else None)
    return out


def hidden_states_on_texts(
    model_dir: str | os.PathLike[str], texts: list[str], *, tokens: int, max_seq: int
) -> list[np.ndarray]:
    """The model's final hidden states ``[n, d]`` per text, over its own tokens (as ``collect``
    takes model A's), one text at a time until ``tokens`` tokens are held; texts with no token
    are left out."""
    tok = load_tokenizer(model_dir)
    model = hf.load_causal_lm(model_dir, uses_head=False)
    out: list[np.ndarray] = []
    held = 0
    for text in texts:
        ids = tok(text, truncation=True, max_length=max_seq, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            continue
        with torch.no_grad():
            hidden = hf.final_hidden(model, ids, torch.ones_like(ids)).float().numpy()[0]
        out.append(hidden)
        held += len(hidden)
        if held >= tokens:
            break
    return out
