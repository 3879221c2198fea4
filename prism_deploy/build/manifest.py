"""``DIR/manifest.json``: what was built, from what, with what, and how well it matched.

Schema (version 1; docs/engines.md describes every field)::

    {"schema": "prism-deploy.engines", "schema_version": 1,
     "adapter": {"file", "sha256", "config", "topology_sha256"},   # an adapter build, or
     "model": {"role", "source", "model_json_sha256", "precision", "copies": [{"file", "sha256", "bytes"}]},
     "engines": [{"id", "configuration", "target", "parts": [{"pipe", "pipe_name", "file",
                  "sha256", "bytes"}], "combine_weights", "session", "tools", "device",
                  "cache_key", "topology_key", "build_seconds", "built_at", "how", "parity"}]}

The manifest is the single source of truth: an engine file that no entry names is garbage,
and an entry whose file's sha256 differs is refused when loading.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from prism_deploy.errors import PrismInputError
from prism_deploy.fsutil import atomic_output, file_sha256

SCHEMA = "prism-deploy.engines"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Engine files carry these suffixes; anything else in DIR (timing caches, the lock) is left alone.
ENGINE_SUFFIXES = (".engine", ".ort.onnx", ".ort.data")


class EngineFileError(PrismInputError):
    """An engine file is missing, corrupt (hash mismatch) or built for another environment."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_hash(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON: the same inputs give the same key on any machine."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def manifest_path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / MANIFEST_NAME


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of ``directory``, or None when there is none. A malformed one is bad input."""
    path = manifest_path(directory)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineFileError(f"{path}: not a readable manifest ({' '.join(str(exc).split())})") from None
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
        raise EngineFileError(f"{path}: not a prism-deploy engine manifest (schema != {SCHEMA!r})")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EngineFileError(f"{path}: manifest schema_version {version!r} is not supported "
                              f"(this tool reads {SCHEMA_VERSION}); rebuild with `prism-deploy build --force`")
    if not isinstance(obj.get("engines"), list) or not any(isinstance(obj.get(k), dict) for k in SOURCE_KINDS):
        raise EngineFileError(f"{path}: manifest lacks 'engines' or a source ({' or '.join(SOURCE_KINDS)})")
    return obj


# What a build folder was built from: an adapter file (``build ADAPTER``) or a model export
# folder (``build --model DIR``); the manifest names its source under this key.
SOURCE_KINDS = ("adapter", "model")


def source_kind(manifest: dict[str, Any]) -> str:
    return "model" if isinstance(manifest.get("model"), dict) else "adapter"


def new_manifest(source: dict[str, Any], engines: list[dict[str, Any]], kind: str = "adapter") -> dict[str, Any]:
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, kind: source, "engines": engines}


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    path = manifest_path(directory)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path



def part_files(part: dict[str, Any]) -> list[tuple[str, str]]:
    """(file name, sha256) of a part: its engine, and its external weights when it has them."""
    files = [(part["file"], part["sha256"])]
    if part.get("data_file"):
        files.append((part["data_file"], part["data_sha256"]))
    return files


def verify_part(directory: Path, part: dict[str, Any]) -> Path:
    """The part's engine file, after checking that it (and its data file) exist and hash as recorded."""
    for name, expected in part_files(part):
        path = directory / name
        if not path.is_file():
            raise EngineFileError(f"{path}: engine file missing (the manifest lists it); "
                                  "rebuild with `prism-deploy build`")
        actual = file_sha256(path)
        if actual != expected:
            raise EngineFileError(f"{path}: sha256 {actual[:12]}... does not match the manifest's "
                                  f"{expected[:12]}... (corrupt or replaced engine); "
                                  "rebuild with `prism-deploy build --force`")
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
    return {name for entry in manifest["engines"] for part in entry["parts"] for name, _ in part_files(part)}


def unreferenced_engine_files(directory: Path, manifest: dict[str, Any]) -> list[Path]:
    """Engine files in ``directory`` that no manifest entry names (superseded builds)."""
    keep = referenced_files(manifest)
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.name.endswith(ENGINE_SUFFIXES) and p.name not in keep)
