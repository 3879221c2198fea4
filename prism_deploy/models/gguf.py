"""GGUF files (llama.cpp's single-file format) as inputs, read by transformers' GGUF loader.

transformers reads a GGUF file's configuration, tokenizer and tensors (``from_pretrained(folder,
gguf_file=name)``, with the ``gguf`` package), dequantizing quantized tensors to float: the
dequantized weights are what is exported. This module is the one place that knows how a GGUF
path is recognised and handed to transformers; it imports no PyTorch (tokenizers need none).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prism_deploy.core.errors import PrismInputError, brief, require

# what transformers raises for a file it cannot read as GGUF (a bad magic number, an architecture
# its GGUF mapping lacks, a tensor of an unexpected shape)
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, NotImplementedError, TypeError)


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """A GGUF file, told by its name (``.gguf``)."""
    return Path(path).suffix.lower() == ".gguf"


def loader_kwargs(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """(folder, keyword arguments) for ``from_pretrained`` to read the GGUF file ``path``."""
    require("gguf", "reading a .gguf file")
    gguf = Path(path)
    if not gguf.is_file():
        raise PrismInputError(f"{path}: not a file (a .gguf model file is expected)")
    return str(gguf.parent), {"gguf_file": gguf.name, "local_files_only": True}


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer a GGUF file carries (its vocabulary and merges), as a fast tokenizer."""
    require("transformers", "reading a tokenizer")
    from transformers import AutoTokenizer

    folder, kwargs = loader_kwargs(path)
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except LOAD_ERRORS as exc:
        raise PrismInputError(f"{path}: transformers cannot read its tokenizer ({brief(exc, 300)})") from None


def source_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What model.json records of a model read from a file: its name, size and SHA-256."""
    from prism_deploy.core.fsutil import file_sha256

    p = Path(path)
    return {"name": p.name, "format": "gguf", "bytes": p.stat().st_size, "sha256": file_sha256(p)}
