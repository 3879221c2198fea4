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


def model_shape(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a GGUF file's metadata says of its model: ``architecture``, ``hidden``, ``layers``,
    ``vocab`` (its ``<arch>.vocab_size``, else the length of its token list) and ``weight_type``
    (the ggml type most of its matrices are stored in: ``F32``, ``F16``, ``Q8_0`` ...). Read with
    the ``gguf`` package, which maps the file rather than reading it."""
    require("gguf", "reading a .gguf file")
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise PrismInputError(f"{path}: not a file (a .gguf model file is expected)")
    try:
        reader = GGUFReader(str(p))
        fields = reader.fields

        def value(key: str) -> Any:
            return fields[key].contents() if key in fields else None

        arch = str(value("general.architecture"))
        vocab = value(f"{arch}.vocab_size")
        if vocab is None and "tokenizer.ggml.tokens" in fields:
            vocab = len(fields["tokenizer.ggml.tokens"].data)
        counts: dict[str, int] = {}
        for tensor in reader.tensors:
            if len(tensor.shape) > 1 and int(min(tensor.shape)) > 1:
                counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise PrismInputError(f"{path}: not a readable GGUF file ({brief(exc, 300)})") from None
    hidden, layers = value(f"{arch}.embedding_length"), value(f"{arch}.block_count")
    return {
        "architecture": arch,
        "hidden": None if hidden is None else int(hidden),
        "layers": None if layers is None else int(layers),
        "vocab": None if vocab is None else int(vocab),
        "weight_type": max(counts, key=lambda k: counts[k]) if counts else None,
    }
