"""Token inputs shared by ``run`` and ``parity --chain``: ``--text`` + tokenizer, or ``--ids FILE``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core import jsontext
from prism_deploy.core.errors import PrismInputError, brief


def add_input_arguments(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--text", help="text to tokenize with the first model's tokenizer (one sequence)")
    group.add_argument(
        "--ids",
        metavar="FILE",
        help="token ids of the first model: .npy [batch, seq] or [seq] integers, or .json (list or list of lists)",
    )
    p.add_argument(
        "--tokenizer-a",
        metavar="DIR",
        help="the first model's tokenizer folder, for --text (default: the chain file's `tokenizers.first`)",
    )


MAX_IDS_FILE_BYTES = 1 << 30  # a token-id file larger than this is not a prompt


def read_inputs(args: argparse.Namespace, chain: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(input_ids [batch, seq] int64, attention_mask or None) from the parsed arguments; with a
    chain (or graph), checked against it here so that a refusal names the user's --ids file or
    --text rather than the runtime's ``input_ids``."""
    ids, mask = _read_inputs(args, chain)
    if chain is not None and hasattr(chain, "prepare_inputs"):
        try:
            chain.prepare_inputs(ids, mask)
        except PrismInputError as exc:
            source = "--text" if args.text is not None else args.ids
            raise PrismInputError(f"{source}: {str(exc).removeprefix('input_ids: ')}") from None
    return ids, mask


def _read_inputs(args: argparse.Namespace, chain: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if args.text is not None:
        tokenizer = args.tokenizer_a or (chain.spec.tokenizers.get("first") if getattr(chain, "spec", None) else None)
        if not tokenizer:
            raise PrismInputError(
                "--text needs --tokenizer-a DIR (the first model's tokenizer), or a chain file with tokenizers.first"
            )
        from prism_deploy.models.tokenizers import load_tokenizer

        enc = load_tokenizer(tokenizer)(args.text, return_tensors="np")
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if ids.shape[1] == 0:
            raise PrismInputError("--text: the tokenizer gave no tokens")
        return ids, np.asarray(enc["attention_mask"], dtype=np.int64)
    return read_ids_file(args.ids), None


def read_ids_file(path: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise PrismInputError(f"{path}: no such file")
    if p.stat().st_size > MAX_IDS_FILE_BYTES:
        raise PrismInputError(f"{path}: {p.stat().st_size} bytes is too large for a file of token ids")
    data: Any
    if p.suffix == ".npy":
        try:
            data = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:  # object arrays, truncated or foreign files
            raise PrismInputError(f"{path}: not a .npy array of token ids ({brief(exc, 150)})") from None
    elif p.suffix == ".json":
        data = jsontext.load_file(path)
    else:
        raise PrismInputError(f"{path}: expected a .npy or .json file of token ids")
    if isinstance(data, list):
        flat = all(_is_id(v) for v in data)
        nested = all(isinstance(row, list) and all(_is_id(v) for v in row) for row in data)
        if not (flat or nested):
            raise PrismInputError(f"{path}: expected a list of token ids or a list of lists of token ids")
    elif not isinstance(data, np.ndarray):
        raise PrismInputError(f"{path}: expected a list of token ids or a list of lists of token ids")
    try:
        ids = np.asarray(data)
    except (ValueError, OverflowError):
        raise PrismInputError(f"{path}: rows of token ids must all have the same length") from None
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.size == 0:
        raise PrismInputError(f"{path}: holds no token ids")
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise PrismInputError(f"{path}: expected integer token ids [batch, seq], got {ids.dtype} {list(ids.shape)}")
    return ids.astype(np.int64)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63
