"""Token inputs shared by ``run`` and ``parity-pipeline``: ``--text`` + tokenizer, or ``--ids FILE``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core.errors import PrismInputError


def add_input_arguments(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--text", help="text to tokenize with --tokenizer-a (one sequence)")
    group.add_argument("--ids", metavar="FILE",
                       help="token ids of model A: .npy [batch, seq] or [seq] integers, or .json (list or list of lists)")
    p.add_argument("--tokenizer-a", metavar="DIR", help="local tokenizer folder of model A (needed with --text)")


def read_inputs(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray | None]:
    """(input_ids [batch, seq] int64, attention_mask or None) from the parsed arguments."""
    if args.text is not None:
        if not args.tokenizer_a:
            raise PrismInputError("--text needs --tokenizer-a DIR (model A's tokenizer)")
        from prism_deploy.models.tokenizers import load_tokenizer

        enc = load_tokenizer(args.tokenizer_a)(args.text, return_tensors="np")
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if ids.shape[1] == 0:
            raise PrismInputError("--text: the tokenizer gave no tokens")
        return ids, np.asarray(enc["attention_mask"], dtype=np.int64)
    return read_ids_file(args.ids), None


def read_ids_file(path: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise PrismInputError(f"{path}: no such file")
    data: Any
    if p.suffix == ".npy":
        data = np.load(p, allow_pickle=False)
    elif p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise PrismInputError(f"{path}: not valid JSON ({exc})") from None
    else:
        raise PrismInputError(f"{path}: expected a .npy or .json file of token ids")
    try:
        ids = np.asarray(data)
    except ValueError:
        raise PrismInputError(f"{path}: rows of token ids must all have the same length") from None
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise PrismInputError(f"{path}: expected integer token ids [batch, seq], got {ids.dtype} {list(ids.shape)}")
    return ids.astype(np.int64)
