"""Local tokenizers (``transformers.AutoTokenizer``): no PyTorch needed, nothing downloaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prism_deploy.core.errors import PrismInputError, brief, require


def load_tokenizer(tok_dir: str | os.PathLike[str]) -> Any:
    """A local tokenizer folder's tokenizer, or the one a ``.gguf`` file carries."""
    require("transformers", "reading a tokenizer")
    from transformers import AutoTokenizer

    from prism_deploy.models import gguf

    if gguf.is_gguf(tok_dir):
        return _windowed(gguf.load_tokenizer(tok_dir))
    if not Path(tok_dir).is_dir():
        raise PrismInputError(f"{tok_dir}: not a folder (a local tokenizer folder is expected)")
    try:
        return _windowed(AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True))
    except (OSError, ValueError, KeyError) as exc:
        raise PrismInputError(f"{tok_dir}: cannot load a tokenizer from it ({brief(exc, 300)})") from None


def _windowed(tokenizer: Any) -> Any:
    """``tokenizer`` without transformers' "sequence length is longer than the specified maximum"
    warning: long texts are tokenized whole on purpose and cut into windows by the caller
    (calibration, validation, collect's truncation, which it reports itself)."""
    said = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(said, dict):  # the warning is given once per tokenizer; mark it given
        said["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer
