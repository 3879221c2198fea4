"""``DIR/manifest.json`` of a build folder: what was built, from what, with what, how well it matched.

Schema (``prism-deploy.engines``, version 2; docs/engines.md describes every field)::

    {"schema": "prism-deploy.engines", "schema_version": 2,
     "adapter": {"file", "sha256", "config", "topology_sha256"},   # an adapter build, or
     "model": {"role", "source", "model_json_sha256", "precision", "copies": [{"file", "sha256", "bytes"}]},
     "engines": [{"id", "configuration", "target", "parts": [{"pipe" | "graph", "file", "sha256", "bytes",
                  ["data_file", "data_sha256", "data_bytes"], ["form"]}], "combine_weights", "session", "tools",
                  "device", "cache_key", "topology_key", "build_seconds", "built_at", "how", "parity",
                  ["forms": {"candidates", "method", "buckets": [{"max_tokens", "timed_tokens", "form",
                                                                  "seconds": {form: s | null}, "passed": {form: bool}}]}]}]}

Version 2 added the gated form chosen per token bucket (``forms``, and ``form`` on each part:
one part per chosen form, the runtime opens one session per part and runs the one whose bucket
holds the request's token count). Version 1 manifests (no ``forms``) are still read.

The manifest is the single source of truth: a file that no entry names is not the build's
(and is never deleted by it unless it carries the build's own name pattern), and an entry
whose file's sha256 differs is refused when loading. The whole manifest is validated against
the schema before any field is used, and every file name in it must stay inside the folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from prism_deploy.core import jsontext
from prism_deploy.core.errors import PrismInputError, brief
from prism_deploy.core.fsutil import PLAIN_FILE_NAME, atomic_output, file_sha256, inside
from prism_deploy.core.limits import FLOAT32_MAX
from prism_deploy.core.precision import MODEL_PRECISIONS, PRECISIONS
from prism_deploy.core.targets import TARGETS

SCHEMA_NAME = "prism-deploy.engines"
SCHEMA_VERSION = 2
# versions this tool reads: 1 is 2 without the per-bucket forms
READABLE_SCHEMA_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
# Engine files carry these suffixes; anything else in DIR (timing caches, the lock) is left alone.
ENGINE_SUFFIXES = (".engine", ".ort.onnx", ".ort.data")
# What a build folder was built from: an adapter file (``build ADAPTER``) or a model export
# folder (``build --model DIR``); the manifest names its source under this key.
SOURCE_KINDS = ("adapter", "model")
# the largest batch or sequence length an engine profile may name (MIN <= OPT <= MAX)
PROFILE_MAX = 1 << 20

_SHA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_NAME = {"type": "string", "minLength": 1}
# a file of the folder: a plain name (no folder, no "..", not absolute), checked before any use
# (a name such as "/etc/passwd" must never reach a read, a hash or a delete)
_FILE = {"type": "string", "pattern": PLAIN_FILE_NAME}
_COUNT = {"type": "integer", "minimum": 0}
_RANGE = {
    "type": "array",
    "minItems": 3,
    "maxItems": 3,
    "items": {"type": "integer", "minimum": 1, "maximum": PROFILE_MAX},
}
_PART = {
    "type": "object",
    "required": ["file", "sha256", "bytes"],
    "properties": {
        "file": _FILE,
        "sha256": _SHA,
        "bytes": _COUNT,
        "data_file": {"anyOf": [_FILE, {"type": "null"}]},
        "data_sha256": {**_SHA, "type": ["string", "null"]},
        "data_bytes": {"type": ["integer", "null"], "minimum": 0},
        "pipe": {"type": ["integer", "null"], "minimum": 0},
        "graph": {"type": "string"},
        "form": {"type": "string", "minLength": 1},
    },
}
_BUCKET = {
    "type": "object",
    "required": ["max_tokens", "timed_tokens", "form", "seconds", "passed"],
    "properties": {
        "max_tokens": {"type": "integer", "minimum": 1},
        "timed_tokens": {"type": "integer", "minimum": 1},
        "form": {"type": "string", "minLength": 1},
        "seconds": {"type": "object", "additionalProperties": {"type": ["number", "null"], "minimum": 0}},
        "passed": {"type": "object", "additionalProperties": {"type": "boolean"}},
    },
}
_FORMS = {
    "type": "object",
    "required": ["candidates", "buckets"],
    "properties": {
        "candidates": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        "method": {"type": "string"},
        "buckets": {"type": "array", "minItems": 1, "items": _BUCKET},
    },
}
_ENTRY = {
    "type": "object",
    "required": ["id", "configuration", "target", "parts", "tools", "device", "cache_key"],
    "properties": {
        "id": _NAME,
        "target": {"enum": list(TARGETS)},
        "configuration": {
            "type": "object",
            "required": ["target", "precision"],
            "properties": {
                "target": {"enum": list(TARGETS)},
                "precision": {"enum": sorted(set(PRECISIONS) | set(MODEL_PRECISIONS))},
                "plugin": {"type": "boolean"},
                "layout": {"type": "string"},
                "profile": {
                    "type": "object",
                    "required": ["batch", "seq"],
                    "properties": {"batch": _RANGE, "seq": _RANGE},
                },
                "version_compatible": {"type": "boolean"},
            },
        },
        "parts": {"type": "array", "minItems": 1, "items": _PART},
        "combine_weights": {"type": ["array", "null"], "items": {"type": "number"}},
        "session": {
            "type": ["object", "null"],
            "required": ["provider", "load_graph_optimization_level"],
            "properties": {
                "provider": {"enum": ["cpu", "cuda"]},
                "load_graph_optimization_level": {
                    "enum": ["ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"]
                },
                "load_session_config": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "tools": {"type": "object", "additionalProperties": {"type": ["string", "null"]}},
        "device": {"type": "object"},
        "cache_key": _SHA,
        "forms": {"anyOf": [_FORMS, {"type": "null"}]},
    },
}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["schema", "schema_version", "engines"],
    "properties": {
        "schema": {"const": SCHEMA_NAME},
        "schema_version": {"type": "integer", "enum": list(READABLE_SCHEMA_VERSIONS)},
        "adapter": {
            "type": "object",
            "required": ["file", "sha256", "config"],
            "properties": {
                "file": _NAME,
                "sha256": _SHA,
                "config": {
                    "type": "object",
                    "required": ["in_dim", "out_dim"],
                    "properties": {
                        "in_dim": {"type": "integer", "minimum": 1},
                        "out_dim": {"type": "integer", "minimum": 1},
                    },
                },
            },
        },
        "model": {
            "type": "object",
            "required": ["role", "model_json_sha256", "copies"],
            "properties": {
                "role": {"type": "string"},
                "model_json_sha256": _SHA,
                "copies": {"type": "array", "items": _PART},
            },
        },
        "engines": {"type": "array", "items": _ENTRY},
    },
    "oneOf": [{"required": ["adapter"]}, {"required": ["model"]}],
}


class EngineFileError(PrismInputError):
    """An engine file or manifest is missing, corrupt (hash mismatch), malformed or built for
    another environment."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_hash(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON: the same inputs give the same key on any machine."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def manifest_path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / MANIFEST_NAME


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The validated manifest of ``directory``, or None when there is none; anything else is bad input."""
    path = manifest_path(directory)
    if not path.exists():
        return None
    obj = jsontext.load_file(path, EngineFileError)
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA_NAME:
        raise EngineFileError(f"{path}: not a prism-deploy engine manifest (schema != {SCHEMA_NAME!r})")
    version = obj.get("schema_version")
    if not (isinstance(version, int) and not isinstance(version, bool)) or version not in READABLE_SCHEMA_VERSIONS:
        raise EngineFileError(
            f"{path}: manifest schema_version {version!r} is not supported "
            f"(this tool reads {', '.join(map(str, READABLE_SCHEMA_VERSIONS))}); "
            "rebuild into a new folder"
        )
    validate_manifest(obj, path)
    return obj


def validate_manifest(obj: Any, where: str | os.PathLike[str]) -> None:
    """The whole manifest against the schema, plus what a schema cannot say: combine weights
    finite in float32 and one per part, unique ids, unique file names."""
    import jsonschema

    try:
        jsonschema.validate(obj, SCHEMA)
    except jsonschema.ValidationError as exc:
        field = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        if exc.schema is _FILE or (exc.validator == "pattern" and field.endswith("file")):
            raise EngineFileError(
                f"{where}: {field}: {exc.instance!r} is not a plain file name inside the "
                "folder (no folder, no '..', not absolute)"
            ) from None
        raise EngineFileError(f"{where}: {field}: {brief(exc.message)}") from None
    ids = [e["id"] for e in obj["engines"]]
    if len(set(ids)) != len(ids):
        raise EngineFileError(f"{where}: engines: duplicate id")
    config = None
    if "adapter" in obj:
        from prism_deploy.core.errors import AdapterFormatError
        from prism_deploy.format.adapter_config import AdapterConfig

        try:
            config = AdapterConfig.from_json(obj["adapter"]["config"])
        except AdapterFormatError as exc:
            raise EngineFileError(f"{where}: adapter.{exc}") from None
    for i, entry in enumerate(obj["engines"]):
        profile = entry["configuration"].get("profile") or {}
        for axis, (lo, opt, hi) in ((k, v) for k, v in profile.items() if k in ("batch", "seq")):
            if not lo <= opt <= hi:
                raise EngineFileError(
                    f"{where}: engines.{i}.configuration.profile.{axis}: {[lo, opt, hi]} is not MIN <= OPT <= MAX"
                )
        for j, part in enumerate(entry["parts"]):
            if config is not None and part.get("pipe") is not None and part["pipe"] >= config.num_pipes:
                raise EngineFileError(
                    f"{where}: engines.{i}.parts.{j}.pipe: {part['pipe']} is not a pipe of the "
                    f"adapter ({config.num_pipes} pipe(s))"
                )
        _check_forms(entry, f"{where}: engines.{i}")
        weights = entry.get("combine_weights")
        if weights is not None:
            if len(weights) != len(entry["parts"]):
                raise EngineFileError(
                    f"{where}: engines.{i}.combine_weights: {len(weights)} weight(s) for {len(entry['parts'])} part(s)"
                )
            if not all(math.isfinite(w) and abs(w) <= FLOAT32_MAX for w in weights):
                raise EngineFileError(f"{where}: engines.{i}.combine_weights: not finite in float32")


def _check_forms(entry: dict[str, Any], where: str) -> None:
    """Parts with a ``form`` go with ``forms``: each bucket's form is one part's, each part is one
    bucket's choice, and the buckets rise (the runtime takes the first that holds the tokens)."""
    forms = entry.get("forms")
    part_forms = [p.get("form") for p in entry["parts"]]
    if not forms:
        if any(f is not None for f in part_forms):
            raise EngineFileError(f"{where}.parts: a part names a form but the entry has no forms")
        return
    if None in part_forms or len(set(part_forms)) != len(part_forms):
        raise EngineFileError(f"{where}.parts: with forms, every part names a form, each once")
    chosen = [b["form"] for b in forms["buckets"]]
    if set(chosen) != set(part_forms):
        raise EngineFileError(
            f"{where}.forms: the buckets choose {sorted(set(chosen))}, the parts hold {sorted(set(part_forms))}"
        )
    tops = [b["max_tokens"] for b in forms["buckets"]]
    if tops != sorted(set(tops)):
        raise EngineFileError(f"{where}.forms.buckets: max_tokens must rise")


def bucket_for(buckets: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """The bucket of an entry's ``forms`` whose range holds ``tokens`` (past the last: the last)."""
    for bucket in buckets:
        if tokens <= bucket["max_tokens"]:
            return bucket
    return buckets[-1]


def new_manifest(source: dict[str, Any], engines: list[dict[str, Any]], kind: str = "adapter") -> dict[str, Any]:
    return {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, kind: source, "engines": engines}


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    validate_manifest(manifest, manifest_path(directory))  # never write what read_manifest would refuse
    path = manifest_path(directory)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")
    return path


def source_kind(manifest: dict[str, Any]) -> str:
    return "model" if isinstance(manifest.get("model"), dict) else "adapter"


def part_files(part: dict[str, Any]) -> list[tuple[str, str]]:
    """(file name, sha256) of a part: its engine, and its external weights when it has them."""
    files = [(part["file"], part["sha256"])]
    if part.get("data_file"):
        files.append((part["data_file"], part["data_sha256"]))
    return files


def verify_part(directory: Path, part: dict[str, Any]) -> Path:
    """The part's engine file, after checking that it (and its data file) exist inside the
    folder and hash as recorded."""
    directory = Path(directory)
    for name, expected in part_files(part):
        try:
            path = inside(directory, name, f"{manifest_path(directory)}: file")
        except PrismInputError as exc:
            raise EngineFileError(str(exc)) from None
        if not path.is_file():
            raise EngineFileError(
                f"{path}: engine file missing (the manifest lists it); rebuild with `prism-deploy build`"
            )
        actual = file_sha256(path)
        if actual != expected:
            raise EngineFileError(
                f"{path}: sha256 {actual[:12]}... does not match the manifest's "
                f"{expected[:12]}... (corrupt or replaced engine); "
                "rebuild with `prism-deploy build --force`"
            )
    return directory / part["file"]


def parts_intact(directory: Path, entry: dict[str, Any]) -> bool:
    try:
        for part in entry["parts"]:
            verify_part(directory, part)
    except EngineFileError:
        return False
    return True


def referenced_files(manifest: dict[str, Any] | None) -> set[str]:
    if manifest is None:
        return set()
    names = {name for entry in manifest["engines"] for part in entry["parts"] for name, _ in part_files(part)}
    if source_kind(manifest) == "model":
        names |= {c["file"] for c in manifest["model"].get("copies", [])}
    return names
