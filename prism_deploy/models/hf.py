"""Local Hugging Face causal LMs: loading, and the few calls whose spelling moved between versions.

Nothing here downloads: every load uses ``local_files_only=True`` on a folder that must exist.
The rest of :mod:`prism_deploy.models` uses these helpers so that the transformers version
differences (``past_key_values`` renamed ``cache`` in transformers 5) live in one place.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism_deploy.core import jsontext
from prism_deploy.core.errors import PrismInputError, brief
from prism_deploy.core.fsutil import inside

# Families exported and tested; others built on the same ``*ForCausalLM`` + ``base_model`` layout
# usually work, and the export's validation step says so either way.
KNOWN_FAMILIES = ("llama", "qwen2", "mistral", "gpt2")


def load_causal_lm(hf_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = None) -> Any:
    """Load a local ``*ForCausalLM`` folder in eval mode (no download, ever)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tiny folders load in milliseconds; our own bars say what runs
    path = Path(hf_dir)
    if is_gguf(path):
        return _load_gguf_causal_lm(path, dtype, attn_implementation)
    if not path.is_dir():
        raise PrismInputError(f"{hf_dir}: not a folder (a local Hugging Face model folder is expected)")
    if not (path / "config.json").is_file():
        raise PrismInputError(f"{hf_dir}: no config.json (a local Hugging Face model folder is expected)")
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        kwargs["torch_dtype"] = kwargs.pop("dtype")
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise PrismInputError(f"{hf_dir}: transformers cannot load it as a causal LM "
                              f"({brief(exc, 300)})") from None
    model.eval()
    if getattr(model.config, "is_encoder_decoder", False):
        raise PrismInputError(f"{hf_dir}: encoder-decoder models are not supported (decoder-only causal LMs only)")
    return model


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """A GGUF file (llama.cpp's single-file format), told by its name and read by
    transformers' GGUF loader (``gguf_file=``), which dequantizes its tensors."""
    return Path(path).suffix.lower() == ".gguf"


def _gguf_kwargs(path: Path) -> dict[str, Any]:
    from prism_deploy.core.errors import require

    require("gguf", "reading a .gguf file")
    if not path.is_file():
        raise PrismInputError(f"{path}: not a file (a .gguf model file is expected)")
    return {"gguf_file": path.name, "local_files_only": True}


def _load_gguf_causal_lm(path: Path, dtype: torch.dtype, attn_implementation: str | None) -> Any:
    """A ``*ForCausalLM`` from a GGUF file; its weights dequantized to ``dtype``."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {**_gguf_kwargs(path), "dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise PrismInputError(f"{path}: transformers cannot load it as a causal LM "
                              f"({brief(exc, 300)})") from None
    model.eval()
    return model


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer a GGUF file carries (its vocabulary and merges), as a fast tokenizer."""
    from transformers import AutoTokenizer

    gguf = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(gguf.parent), **_gguf_kwargs(gguf))
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise PrismInputError(f"{path}: transformers cannot read its tokenizer ({brief(exc, 300)})") from None


def family(model: Any) -> str:
    return str(model.config.model_type)


def cache_dims(config: Any) -> dict[str, int]:
    """Layers, KV heads and head size of the decoder's KV cache (names differ per family)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer")
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return {"layers": int(layers), "kv_heads": int(kv_heads), "head_dim": int(head_dim), "hidden": int(hidden)}


def max_positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return None


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over the real tokens only, as ``generate`` does for left padding.

    Padding slots get position 1 (any valid index: their outputs are ignored). Without padding
    this equals ``arange(seq)``, the models' own default.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _cache_kwarg(model: Any) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def make_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=pairs)
    except TypeError:  # older transformers
        return DynamicCache.from_legacy_cache(tuple(pairs))  # type: ignore[attr-defined]


def cache_pairs(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A model's returned cache as [(key, value)] per layer, each [batch, kv_heads, seq, head_dim]."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]


def causal_lm_forward(model: Any, *, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                      inputs_embeds: torch.Tensor | None = None, cache: Any = None, use_cache: bool = False,
                      position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    """(logits, returned cache) with positions taken from the mask unless given."""
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask)
        new = (input_ids if input_ids is not None else inputs_embeds).shape[1]  # type: ignore[union-attr]
        position_ids = position_ids[:, -new:]
    kwargs = {_cache_kwarg(model): cache} if cache is not None else {}
    out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                position_ids=position_ids, use_cache=use_cache, **kwargs)
    # read as a mapping: transformers 5 warns on the old attribute name, even to say it is unset
    keys = out.keys() if hasattr(out, "keys") else ()
    returned = out["cache"] if "cache" in keys else out["past_key_values"] if "past_key_values" in keys else None
    return out.logits, returned


def final_hidden(model: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor, *,
                 inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last hidden state after its final norm, before the LM head, from token ids
    (a chain's first model) or from input embeddings (a middle model)."""
    out = model.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           position_ids=positions_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state


def input_embedding_matrix(model: Any) -> np.ndarray:
    return model.get_input_embeddings().weight.detach().float().cpu().numpy()


def load_input_embedding_matrix(hf_dir: str | os.PathLike[str]) -> np.ndarray:
    """Model B's input embedding matrix [vocab, d] as float32, read alone from its safetensors.

    Collecting Z needs only this table: a skeleton of the model on the meta device (no memory)
    names the parameter, and only that tensor is read. Checkpoints whose tensor names differ
    from the module's (renamed by a conversion) fall back to loading the whole model.
    """

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(hf_dir)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        weight = skeleton.get_input_embeddings().weight
        name = next(n for n, p in skeleton.named_parameters() if p is weight)
        index = path / "model.safetensors.index.json"
        shard = "model.safetensors"
        if index.is_file():
            obj = jsontext.load_file(index)
            weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
            if not isinstance(weight_map, dict) or name not in weight_map:
                raise PrismInputError(f"{index}: weight_map names no shard for {name!r}")
            shard = str(weight_map[name])
        with safe_open(str(inside(path, shard, f"{index}: weight_map")), framework="pt") as fh:
            if name not in fh.keys():
                raise KeyError(name)
            return fh.get_tensor(name).float().numpy()
    except (OSError, KeyError, StopIteration, ValueError):
        return input_embedding_matrix(load_causal_lm(path))
