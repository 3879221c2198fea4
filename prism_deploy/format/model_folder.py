"""The model folder ``export-model`` writes: ``model.json`` and the graphs it lists.

``model.json`` (``format: prism-deploy-model``, version 1) records the role, the dims, the
graphs and copied tables with their sha256, and the validation figures. Its schema is checked
whole when it is read, and every file name in it must stay inside its folder
(:func:`prism_deploy.core.fsutil.inside`). The graph inputs and outputs of each role are
defined here, so the exporter that writes them and the runtime that feeds them agree.

A model in a chain has one of three roles, named by what goes in and out:

- ``first``: ``input_ids``, ``attention_mask`` -> ``hidden`` (the last hidden state after the
  final norm, before the LM head);
- ``middle``: ``inputs_embeds``, ``attention_mask`` -> ``hidden`` (likewise);
- ``last``: ``inputs_embeds``, ``attention_mask`` -> ``logits``, and a KV-cache graph for
  decoding, with the model's input embedding table (``embed_tokens.npy``) to feed its own tokens.

(The names, dtypes and dims are :mod:`prism_deploy.format.stage_io`'s table, read here.)

``upper`` and ``lower`` are the names earlier releases gave ``first`` and ``last``: a folder
that records them reads as the new role, and ``--role upper|lower`` is accepted with a note.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prism_deploy.core import jsontext
from prism_deploy.core.errors import PrismInputError, brief
from prism_deploy.core.fsutil import PLAIN_FILE_NAME, file_sha256, inside
from prism_deploy.core.precision import MODEL_PRECISIONS
from prism_deploy.format.stage_io import STAGE_IO, StageTensor, decode_io, input_names, output_name, past_names

FORMAT = "prism-deploy-model"
VERSION = 1
MODEL_JSON = "model.json"
LOCK_NAME = ".export.lock"  # export-model's lock file where the folder itself cannot be locked (not POSIX)
# export-model traces each graph in a scratch folder ".trace-<8 random>" inside the output folder,
# marked by TRACE_MARK as it is made: a later export removes the ones a killed export left.
TRACE_PREFIX = ".trace-"
TRACE_MARK = ".prism-export-trace"
ROLES = ("first", "middle", "last")
ROLE_ALIASES = {"upper": "first", "lower": "last"}  # the names of releases before chains
# The graphs of each role, by their key in model.json's "files".
GRAPHS = {"first": ("graph",), "middle": ("graph",), "last": ("graph", "graph_with_past")}
# Graph forms (docs/model-forms.md): ``portable`` is standard ONNX from the PyTorch tracer (what
# TensorRT parses); ``ort`` is ONNX Runtime's fused form (GroupQueryAttention with rotary inside,
# SkipSimplifiedLayerNormalization, MatMulNBits, fused QKV) from ONNX Runtime GenAI's model
# builder: one graph per role, with a KV cache that past and present share in one buffer.
GRAPH_FORMS = ("portable", "ort")
GRAPHS_BY_FORM: dict[str, dict[str, tuple[str, ...]]] = {
    "portable": GRAPHS,
    "ort": {"first": ("graph",), "middle": ("graph",), "last": ("graph",)},
}
# What the ort form's graph of each role gives (ONNX Runtime GenAI's names).
OUTPUT_ORT_FORM = {"first": "hidden_states", "middle": "hidden_states", "last": "logits"}
# Files that travel with the graphs (copied into a build folder so that it runs on its own).
TABLES = ("embed_tokens",)
# What each role takes and gives (the hand-off of a chain, from format.stage_io).
INPUT = {role: input_names(role)[0] for role in ROLES}
OUTPUT = {role: output_name(role) for role in ROLES}
# A last model's KV-cache graph (either form) takes an optional input, an initializer it may be fed
# over: the first position whose logits it computes ([1] int64, a Slice start on the sequence
# axis). Its default 0 gives every position (parity, perplexity); generation feeds -1 and gets the
# last position only, so the prefill does not run the LM head over the whole prompt (ONNX Runtime
# runs every node whatever outputs are asked for: docs/model-forms.md, "Prefill logits").
LOGITS_START = "logits_start"


def canonical_role(role: str, option: str = "--role") -> str:
    """``first``, ``middle`` or ``last`` (``upper`` / ``lower`` read as their new names)."""
    role = ROLE_ALIASES.get(role, role)
    if role not in ROLES:
        raise PrismInputError(f"{option}: {role!r} is not one of {', '.join(ROLES)}")
    return role


_FILE = {
    "type": "object",
    "required": ["name", "sha256"],
    "properties": {
        "name": {"type": "string", "pattern": PLAIN_FILE_NAME},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    },
}
_POS_INT = {"type": "integer", "minimum": 1}
# int8 / int4 exports (docs/quantized-models.md, "What model.json records"): the options, and per
# graph the plan ({node: 4, 8, or null for float}) and one record per weight, with the error
# measured on calibration text where the mixed plan measured it ({"4": e, "8": e}).
_ERRORS = {
    "type": "object",
    "additionalProperties": {"type": "number", "minimum": 0},
    "propertyNames": {"enum": ["4", "8"]},
}
_LAYER = {
    "type": "object",
    "required": ["node"],
    "properties": {
        "node": {"type": "string"},
        "bits": {"enum": [4, 8]},
        "algorithm": {"enum": ["rtn", "hqq", "k_quant", "gptq"]},
        "error": _ERRORS,
        "quantized": {"type": "string"},
        "kept": {"type": "string"},
    },
}
_QUANT_GRAPH = {
    "type": "object",
    "required": ["layers"],
    "properties": {
        "plan": {"type": "object", "additionalProperties": {"enum": [4, 8, None]}},
        "layers": {"type": "array", "items": _LAYER},
    },
}
_QUANTIZATION = {
    "type": "object",
    "required": ["bits", "form", "graphs"],
    "properties": {
        "bits": {"enum": [4, 8]},
        "form": {"enum": ["nbits", "dq"]},
        "algorithm": {"enum": ["rtn", "hqq", "k_quant", "gptq"]},
        "mixed": {"type": "boolean"},
        "max_error": {"type": ["number", "null"], "exclusiveMinimum": 0},
        "calibration": {
            "type": "object",
            "required": ["source", "tokens"],
            # source "chain": the hop's adapter outputs on text (export-model --calibration-chain)
            "properties": {
                "source": {"type": "string"},
                "tokens": _POS_INT,
                "chain": {"type": "string"},
                "hop": _POS_INT,
                "upstream_model": {"type": "string"},
                "adapter": {"type": "string"},
                "adapter_sha256": {"type": "string"},
                "text": {"type": "string"},
            },
        },
        "graphs": {"type": "object", "additionalProperties": _QUANT_GRAPH},
    },
}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["format", "version", "role", "precision", "max_seq", "dims", "files"],
    "properties": {
        "format": {"const": FORMAT},
        "version": {"const": VERSION},
        "role": {"enum": [*ROLES, *ROLE_ALIASES]},
        "precision": {"enum": list(MODEL_PRECISIONS)},
        "max_seq": {"type": "integer", "minimum": 2},
        "dims": {
            "type": "object",
            "required": ["hidden", "vocab", "layers", "kv_heads", "head_dim"],
            "properties": {k: _POS_INT for k in ("hidden", "vocab", "layers", "kv_heads", "head_dim")},
        },
        "files": {"type": "object", "required": ["graph"], "additionalProperties": _FILE},
        "eos_token_id": {"type": ["integer", "null"], "minimum": 0},
        "graph_form": {"enum": list(GRAPH_FORMS)},
        "quantization": _QUANTIZATION,
    },
}


def _named(tensors: tuple[StageTensor, ...]) -> dict[str, list[str]]:
    return {t.name: list(t.dims) for t in tensors}


def io_description(role: str, layers: int) -> dict[str, Any]:
    """Inputs and outputs of each graph of ``role``, with named dims (recorded in model.json)."""
    inputs, outputs = STAGE_IO[role]
    description: dict[str, Any] = {"inputs": _named(inputs), "outputs": _named(outputs)}
    if role == "last":
        with_past = decode_io(layers)
        description["with_past"] = {
            "inputs": _named(with_past[0]),
            "outputs": _named(with_past[1]),
            "optional_inputs": {LOGITS_START: [1]},
        }
    return description


def graph_form(manifest: dict[str, Any]) -> str:
    """``portable`` (folders written before forms existed) or ``ort``."""
    return str(manifest.get("graph_form", "portable"))


def ort_form_io(role: str, layers: int) -> dict[str, Any]:
    """Inputs and outputs of the ``ort`` form's one graph per role (ONNX Runtime GenAI's names)."""
    inputs: dict[str, Any] = (
        {"input_ids": ["batch", "seq"]} if role == "first" else {"inputs_embeds": ["batch", "seq", "hidden"]}
    )
    inputs.update(
        {
            "attention_mask": ["batch", "total_seq"],
            **{n: ["batch", "kv_heads", "past_seq", "head_dim"] for n in past_names(layers)},
        }
    )
    out = {OUTPUT_ORT_FORM[role]: ["batch", "seq", "vocab" if role == "last" else "hidden"]}
    optional = {"optional_inputs": {LOGITS_START: [1]}} if role == "last" else {}
    return {
        "inputs": inputs,
        "outputs": {
            **out,
            **{n: ["batch", "kv_heads", "total_seq", "head_dim"] for n in past_names(layers, "present")},
        },
        **optional,
    }


def right_padding_shifts(attention_mask: Any) -> Any:
    """How far each row's real tokens move left when a left-padded batch is fed right-padded.

    GroupQueryAttention counts a row's real tokens from position 0 (``seqlens_k`` = real - 1): it
    takes right padding only. The ``ort`` form's runners roll each row left by its padding, run,
    and roll the outputs back (:func:`roll_rows`), so its callers keep this project's left padding."""
    import numpy as np

    return (np.asarray(attention_mask) == 0).sum(axis=1)


def roll_rows(x: Any, shifts: Any, sign: int = -1) -> Any:
    """Each row ``x[i]`` rolled along its first axis by ``sign * shifts[i]`` (a copy)."""
    import numpy as np

    x = np.asarray(x)
    if not np.any(shifts):
        return x
    return np.stack([np.roll(x[i], sign * int(s), axis=0) for i, s in enumerate(shifts)])


def validate_model_json(manifest: Any, where: str) -> dict[str, Any]:
    """Check ``manifest`` against the schema and the role's graphs; one error line naming the field."""
    import jsonschema

    try:
        jsonschema.validate(manifest, SCHEMA)
    except jsonschema.ValidationError as exc:
        field = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        if exc.validator == "pattern" and field.endswith(".name"):
            raise PrismInputError(
                f"{where}: {field}: {exc.instance!r} is not a plain file name inside the folder "
                "(no folder, no '..', not absolute)"
            ) from None
        raise PrismInputError(f"{where}: {field}: {brief(exc.message)}") from None
    manifest = dict(manifest)
    manifest["role"] = ROLE_ALIASES.get(manifest["role"], manifest["role"])
    graphs = GRAPHS_BY_FORM[graph_form(manifest)][manifest["role"]]
    missing = [g for g in (*graphs, *(TABLES if manifest["role"] == "last" else ())) if g not in manifest["files"]]
    if missing:
        raise PrismInputError(f"{where}: files: role {manifest['role']!r} needs {', '.join(missing)}")
    return manifest


def read_model_json(model_dir: str | os.PathLike[str], role: str | None = None) -> dict[str, Any]:
    """``model.json`` of a model folder, validated, checked for the expected role."""
    path = Path(model_dir) / MODEL_JSON
    if not path.is_file():
        raise PrismInputError(f"{model_dir}: no {MODEL_JSON} (not a folder written by `prism-deploy export-model`)")
    raw = jsontext.load_file(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise PrismInputError(f"{path}: not a prism-deploy model manifest")
    manifest = validate_model_json(raw, str(path))
    if role is not None and manifest.get("role") != canonical_role(role, "role"):
        raise PrismInputError(f"{model_dir}: exported as role {manifest.get('role')!r}, {role!r} is needed here")
    return manifest


def file_path(model_dir: str | os.PathLike[str], manifest: dict[str, Any], key: str) -> Path:
    """The file model.json lists under ``key``, confined to the folder."""
    return inside(model_dir, manifest["files"][key]["name"], f"{Path(model_dir) / MODEL_JSON}: files.{key}.name")


def graph_files(manifest: dict[str, Any], key: str) -> list[dict[str, str]]:
    """model.json records of a graph: the ``.onnx`` and its external data file (``<stem>_data``:
    a portable graph over 2 GiB; ``<key>_data``: the ort form's, always)."""
    files = manifest["files"]
    stem = files[key]["name"].split(".")[0]
    return [files[k] for k in dict.fromkeys((key, f"{stem}_data", f"{key}_data")) if k in files]


def verify_files(model_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Every file model.json lists is there, inside the folder, and hashes as recorded (a graph
    changed behind the manifest is bad input, not a new model)."""
    for key, record in manifest["files"].items():
        path = file_path(model_dir, manifest, key)
        if not path.is_file():
            raise PrismInputError(f"{path}: missing ({MODEL_JSON} lists it as {key!r})")
        if file_sha256(path) != record["sha256"]:
            raise PrismInputError(
                f"{path}: sha256 differs from {MODEL_JSON} (changed after the export; export the model again)"
            )


def not_an_adapter(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not an adapter, where it is something else the project writes (a model
    export or build folder); None when it is none of those."""
    p = Path(path)
    if p.is_dir() and (p / MODEL_JSON).is_file():
        return (
            "a model folder (export-model or build --model), where an adapter belongs: give an adapter "
            ".safetensors, .onnx or build folder"
        )
    return None


def is_own_trace(path: Path) -> bool:
    """A scratch folder export-model made (its name and its mark), left by a killed export."""
    return (
        path.name.startswith(TRACE_PREFIX) and not path.is_symlink() and path.is_dir() and (path / TRACE_MARK).is_file()
    )


def check_export_folder(model_dir: str | os.PathLike[str], force: bool = False) -> None:
    """``export-model -o DIR`` writes into a new or empty folder, or over an earlier export (only
    the files its ``model.json`` lists, and hidden ``.*.tmp`` names of a killed export). Anything
    else there (a user's files, a Hugging Face folder, a build) is refused unless ``force``, and
    even then only the export's own file names are written; nothing else is deleted."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return
    names = {p.name for p in folder.iterdir()}
    listed: set[str] = set()
    if MODEL_JSON in names:
        try:
            listed = {MODEL_JSON, *(r["name"] for r in read_model_json(folder)["files"].values())}
        except PrismInputError:
            listed = set()
    foreign = sorted(
        n
        for n in names - listed
        if n != LOCK_NAME and not (n.startswith(".") and n.endswith(".tmp")) and not is_own_trace(folder / n)
    )
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise PrismInputError(
            f"-o {model_dir}: holds files export-model did not write ({shown}); export into a "
            "new or empty folder, or pass --force (they are kept; files of the same names "
            "as the export's are replaced)"
        )
