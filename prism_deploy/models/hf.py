"""Local Hugging Face causal LMs: loading, and the few calls whose spelling moved between versions.

Nothing here downloads: every load uses ``local_files_only=True`` on a folder that must exist.
The rest of :mod:`prism_deploy.models` uses these helpers so that the transformers version
differences (``past_key_values`` renamed ``cache`` in transformers 5) live in one place.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism_deploy.core import jsontext
from prism_deploy.core.errors import PrismInputError, brief
from prism_deploy.core.fsutil import inside
from prism_deploy.models import gguf

# Families exported and tested; others built on the same ``*ForCausalLM`` + ``base_model`` layout
# usually work, and the export's validation step says so either way.
KNOWN_FAMILIES = ("llama", "qwen2", "mistral", "gpt2")


# Checkpoint keys a family legitimately lacks or carries beyond its ``*ForCausalLM`` class, by
# family (``config.model_type``): everything else missing or unexpected is an error, since
# transformers only logs it and initialises the missing weights at random.
# - bert: a sentence-embedding checkpoint (sentence-transformers) keeps the pooler that
#   ``BertLMHeadModel`` does not have.
EXTRA_KEYS_ALLOWED: dict[str, tuple[str, ...]] = {"bert": (r"(bert\.)?pooler\..*",)}
# A tied LM head (``tie_word_embeddings``) is the input embedding: a checkpoint need not hold it.
TIED_HEAD_KEYS = (r"lm_head\.weight", r"cls\.predictions\.decoder\.weight")

# The sizes config.json may declare (a field outside them is a broken config, not a big model).
CONFIG_BOUNDS = {
    "num_hidden_layers": 1024,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 23,
    "max_position_embeddings": 1 << 24,
    "head_dim": 1 << 14,
}
# config.json names some of them differently per family (GPT-2 keeps its own names).
_CONFIG_ALIASES = {
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "hidden_size": "n_embd",
    "max_position_embeddings": "n_positions",
    "intermediate_size": "n_inner",
}
_REQUIRED = ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size")
# A config whose float32 weights are this many times its checkpoint's bytes does not describe that
# checkpoint (fp16/bf16 checkpoints load at 2x): refused before anything is allocated.
_CHECKPOINT_GROWTH = 4


def load_config(hf_dir: str | os.PathLike[str]) -> Any:
    """The folder's config.json through transformers, its sizes checked (:func:`check_config`)."""
    from transformers import AutoConfig

    path = Path(hf_dir)
    if not path.is_dir():
        raise PrismInputError(f"{hf_dir}: not a folder (a local Hugging Face model folder is expected)")
    if not (path / "config.json").is_file():
        raise PrismInputError(f"{hf_dir}: no config.json (a local Hugging Face model folder is expected)")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # JSON, strict dataclass and unknown-type errors come as many types
        raise PrismInputError(f"{path / 'config.json'}: transformers refuses it ({brief(exc, 300)})") from None
    check_config(config, path / "config.json")
    return config


def check_config(config: Any, where: object) -> None:
    """Every size the model is built from is a whole number in its bounds, and the heads divide
    the width: one place for what a broken config.json looks like."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    values: dict[str, Any] = {}
    for key, bound in CONFIG_BOUNDS.items():
        alias = _CONFIG_ALIASES.get(key)
        value = getattr(text, key, None)
        if value is None and alias:
            value = getattr(text, alias, None)
        if value is None:
            if key in _REQUIRED:
                raise PrismInputError(f"{where}: no {key}")
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
            raise PrismInputError(f"{where}: {key} {value!r} must be a whole number in 1..{bound}")
        values[key] = value
    heads, kv_heads = values["num_attention_heads"], values.get("num_key_value_heads", values["num_attention_heads"])
    if "head_dim" not in values and values["hidden_size"] % heads:
        raise PrismInputError(
            f"{where}: hidden_size {values['hidden_size']} is not a multiple of num_attention_heads {heads}"
        )
    if heads % kv_heads:
        raise PrismInputError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    for source in (config, getattr(config, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        ids = eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < values["vocab_size"] for i in ids):
            raise PrismInputError(
                f"{where}: eos_token_id {eos!r} is not a token id below vocab_size {values['vocab_size']}"
            )


def _checkpoint_files(path: Path) -> list[Path]:
    """The weight files transformers would read, each checked readable: a safetensors header
    is parsed here (a truncated, empty or foreign file is named, not a traceback)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # SafetensorError, OSError
            raise PrismInputError(f"{file}: not a readable safetensors file ({brief(exc, 200)})") from None
    return files or sorted(path.glob("pytorch_model*.bin"))


def _check_size(config: Any, files: list[Path], where: object) -> None:
    """Refuse a config that describes far more weights than the checkpoint holds, before the
    model is allocated (a vocab_size of 10^12 would take the memory of the machine)."""
    from transformers import AutoModelForCausalLM

    held = sum(f.stat().st_size for f in files)
    if not held:
        return  # no weight file: transformers names what it looked for
    try:
        with torch.device("meta"), quiet_loading():
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 -- the real load below says why
        return
    declared = 4 * sum(p.numel() for p in skeleton.parameters())
    if declared > _CHECKPOINT_GROWTH * held + (64 << 20):
        raise PrismInputError(
            f"{where}: config.json describes {declared / 2**20:.0f} MiB of float32 weights, "
            f"the checkpoint holds {held / 2**20:.1f} MiB: the config does not match the checkpoint"
        )


def load_causal_lm(
    hf_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    *,
    uses_head: bool = True,
) -> Any:
    """Load a local ``*ForCausalLM`` folder, or a ``.gguf`` file, in eval mode (no download, ever).

    Every weight must come from the checkpoint: missing, unexpected or mis-sized keys are bad
    input (transformers would initialise them at random), except those the family lacks
    legitimately (``EXTRA_KEYS_ALLOWED``, ``TIED_HEAD_KEYS``) and, with ``uses_head=False``
    (a chain's first or middle model, which reads the base model only), the LM head's.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tiny folders load in milliseconds; our own bars say what runs
    path = Path(hf_dir)
    if gguf.is_gguf(path):
        return _load_gguf_causal_lm(path, dtype, attn_implementation, uses_head=uses_head)
    config = load_config(path)
    files = _checkpoint_files(path)
    _check_size(config, files, hf_dir)
    kwargs: dict[str, Any] = {
        "local_files_only": True,
        "dtype": dtype,
        "config": config,
        "output_loading_info": True,
        "ignore_mismatched_sizes": True,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with quiet_loading(), warnings.catch_warnings():  # its load report is replaced by the check below
            warnings.simplefilter("ignore")  # torch's pickle-protocol warning on a .bin checkpoint
            loaded: Any = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
            model, info = loaded
    except pickle.UnpicklingError as exc:
        raise PrismInputError(
            f"{hf_dir}: its PyTorch checkpoint holds more than tensors, and pickled objects are "
            f"not loaded (they could run code); save it as safetensors ({brief(exc, 80)})"
        ) from None
    except Exception as exc:  # a pickled .bin, an unknown architecture...: many types, one line
        raise PrismInputError(
            f"{hf_dir}: transformers cannot load it as a causal LM ({type(exc).__name__}: {brief(exc, 300)})"
        ) from None
    model.eval()
    if getattr(model.config, "is_encoder_decoder", False):
        raise PrismInputError(f"{hf_dir}: encoder-decoder models are not supported (decoder-only causal LMs only)")
    check_loaded_keys(model, info, hf_dir, uses_head=uses_head)
    return model


def _load_gguf_causal_lm(path: Path, dtype: torch.dtype, attn_implementation: str | None, *, uses_head: bool) -> Any:
    """A ``*ForCausalLM`` from a GGUF file, its weights dequantized to ``dtype``; its keys are
    checked as a folder's are (:func:`check_loaded_keys`)."""
    from transformers import AutoModelForCausalLM

    folder, kwargs = gguf.loader_kwargs(path)
    kwargs["dtype"] = dtype
    kwargs["output_loading_info"] = True
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with quiet_loading(gguf_file=True):
            loaded: Any = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        model, info = loaded
    except gguf.LOAD_ERRORS as exc:
        raise PrismInputError(f"{path}: transformers cannot load it as a causal LM ({brief(exc, 300)})") from None
    model.eval()
    check_loaded_keys(model, info, path, uses_head=uses_head)
    return model


@contextlib.contextmanager
def quiet_loading(gguf_file: bool = False) -> Iterator[None]:
    """transformers' own chatter while it builds or loads a model, silenced: its warnings and
    notes (``BertLMHeadModel`` asks for ``is_decoder=True`` when a sentence encoder is read as
    a first model, whose head is never used) and, with ``gguf_file``, the GGUF loader's tensor bar,
    which it draws with plain tqdm rather than its switchable one. The command prints its own
    progress; errors still raise, and transformers' error-level log lines still show."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    with contextlib.ExitStack() as undo:
        undo.callback(hf_logging.set_verbosity, verbosity)
        if gguf_file:
            import transformers.modeling_gguf_pytorch_utils as gguf_loader

            bar = getattr(gguf_loader, "tqdm", None)
            if bar is not None:  # a transformers that moved it draws whatever bar it draws
                setattr(gguf_loader, "tqdm", functools.partial(bar, disable=True))
                undo.callback(setattr, gguf_loader, "tqdm", bar)
        yield


def check_loaded_keys(model: Any, info: dict[str, Any], where: object, *, uses_head: bool = True) -> None:
    """Raise naming the checkpoint keys that do not match the model (see :func:`load_causal_lm`)."""
    import re

    config = model.config
    base = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    tied = bool(getattr(config, "tie_word_embeddings", False))
    allowed_extra = EXTRA_KEYS_ALLOWED.get(str(config.model_type), ())

    def lacks_legitimately(key: str) -> bool:
        if tied and any(re.fullmatch(p, key) for p in TIED_HEAD_KEYS):
            return True
        return not uses_head and bool(base) and not key.startswith(base)  # the head, unused by this role

    missing = sorted(k for k in info.get("missing_keys", ()) if not lacks_legitimately(k))
    unexpected = sorted(
        k for k in info.get("unexpected_keys", ()) if not any(re.fullmatch(p, k) for p in allowed_extra)
    )
    mismatched = sorted(str(m[0]) if isinstance(m, (list, tuple)) else str(m) for m in info.get("mismatched_keys", ()))
    problems = []
    for what, keys in (
        ("missing from the checkpoint", missing),
        ("in the checkpoint but not in the model", unexpected),
        ("of another shape in the checkpoint than config.json says", mismatched),
    ):
        if keys:
            problems.append(f"{len(keys)} weight(s) {what}: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}")
    if problems:
        raise PrismInputError(
            f"{where}: the checkpoint does not match config.json ({'; '.join(problems)}); "
            "nothing is initialised at random"
        )


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


def causal_lm_forward(
    model: Any,
    *,
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    cache: Any = None,
    use_cache: bool = False,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Any]:
    """(logits, returned cache) with positions taken from the mask unless given."""
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask)
        new = (input_ids if input_ids is not None else inputs_embeds).shape[1]  # type: ignore[union-attr]
        position_ids = position_ids[:, -new:]
    kwargs = {_cache_kwarg(model): cache} if cache is not None else {}
    out = model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
        **kwargs,
    )
    # read as a mapping: transformers 5 warns on the old attribute name, even to say it is unset
    keys = out.keys() if hasattr(out, "keys") else ()
    returned = out["cache"] if "cache" in keys else out["past_key_values"] if "past_key_values" in keys else None
    return out.logits, returned


def final_hidden(
    model: Any,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    *,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decoder's last hidden state after its final norm, before the LM head, from token ids
    (a chain's first model) or from input embeddings (a middle model)."""
    out = model.base_model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        use_cache=False,
    )
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
    if gguf.is_gguf(path):  # one file: its tensors are read (and dequantized) together
        return input_embedding_matrix(load_causal_lm(path))
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
