"""The chain file: a chain of models and adapters, ``chain.toml`` (or ``chain.json``).

    name = "math-code-science"        # optional
    target = "ort-cpu"                # optional: every stage's default

    [tokenizers]                      # optional: for --text, and to decode generated tokens
    first = "models/math"
    last = "models/science"

    [[stages]]
    model = "exports/math"            # the first model: an export-model or build --model folder
    hf = "models/math"                # optional: its Hugging Face folder (parity, collect)

    [[stages]]
    adapter = "adapters/math-code.safetensors"   # or an exported .onnx, or a build folder
    precision = "fp32"                # optional: the precision to lower or load
    reference = "adapters/math-code.safetensors" # optional: the .safetensors parity compares with

    [[stages]]
    model = "exports/code"            # a middle model
    ...

Stages alternate model, adapter, model, ..., model: at least two models. Paths are relative to
the chain file's folder. A stage may carry ``sha256``: of the file (an adapter file), or of the
folder's ``manifest.json`` (a build folder) or ``model.json`` (an export folder), checked before
anything runs; ``build --chain`` writes them. The file is validated whole against ``SCHEMA``
(unknown keys, wrong types, a stage with both or neither of ``model`` and ``adapter``): one
error line naming the stage. Whether the roles, widths and files fit together is checked from
the stages' headers and manifests alone by :func:`check_chain` (``build --chain``, before it
builds anything) and again by the runtime when it opens the chain (``prism_deploy.runtime.chain``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prism_deploy.core import jsontext
from prism_deploy.core.errors import GraphFileAsChain, PrismInputError, brief
from prism_deploy.core.fsutil import file_sha256
from prism_deploy.core.precision import PRECISIONS, Precision
from prism_deploy.core.targets import TARGET_CHOICES
from prism_deploy.format.engine_manifest import MANIFEST_NAME
from prism_deploy.format.model_folder import MODEL_JSON

SCHEMA_NAME = "prism-deploy.chain"
SCHEMA_VERSION = 1
SUFFIXES = (".toml", ".json")
BUILT_BY = "prism-deploy build --chain"
_PATH = {"type": "string", "minLength": 1}
_SHA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_COMMON = {"name": {"type": "string", "minLength": 1}, "target": {"enum": list(TARGET_CHOICES)}, "sha256": _SHA}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["stages"],
    "properties": {
        "schema": {"const": SCHEMA_NAME},
        "schema_version": {"type": "integer", "const": SCHEMA_VERSION},
        # written by ``build --chain`` into the file it owns (so a later build may replace it)
        "built_by": {"const": BUILT_BY},
        "name": {"type": "string"},
        "target": {"enum": list(TARGET_CHOICES)},
        "tokenizers": {"type": "object", "additionalProperties": False, "properties": {"first": _PATH, "last": _PATH}},
        "stages": {
            "type": "array",
            "minItems": 3,
            "items": {
                "oneOf": [
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["model"],
                        "properties": {"model": _PATH, "hf": _PATH, **_COMMON},
                    },
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["adapter"],
                        "properties": {
                            "adapter": _PATH,
                            "reference": _PATH,
                            "precision": {"enum": list(PRECISIONS)},
                            **_COMMON,
                        },
                    },
                ]
            },
        },
    },
}


@dataclass
class StageSpec:
    """One stage as the chain file gives it, paths resolved against the file's folder."""

    index: int
    kind: str  # "model" or "adapter"
    path: Path
    name: str
    target: str | None = None
    precision: Precision | None = None  # parsed here, from the file (its schema lists the names)
    hf: Path | None = None  # a model's Hugging Face folder
    reference: Path | None = None  # an adapter's .safetensors, for parity
    sha256: str | None = None

    @property
    def label(self) -> str:
        """How errors name the stage: its number (from 1), kind and name."""
        return f"stage {self.index + 1} ({self.kind} {self.name})"


@dataclass
class ChainSpec:
    path: Path | None
    stages: list[StageSpec]
    name: str | None = None
    target: str | None = None
    tokenizers: dict[str, Path] = field(default_factory=dict)

    @property
    def models(self) -> list[StageSpec]:
        return [s for s in self.stages if s.kind == "model"]

    @property
    def adapters(self) -> list[StageSpec]:
        return [s for s in self.stages if s.kind == "adapter"]

    def where(self) -> str:
        return str(self.path) if self.path is not None else "chain"


def read_chain_file(path: str | os.PathLike[str]) -> ChainSpec:
    """Parse and validate a chain file (TOML or JSON, by its suffix)."""
    p = Path(path)
    return chain_from_object(parse_file(p), p)


def parse_file(p: Path, what: str = "chain file") -> Any:
    """A chain or graph file's parsed TOML or JSON (by its suffix); one error line naming it
    (and ``what`` the command took it for)."""
    if p.suffix not in SUFFIXES:
        raise PrismInputError(f"{p}: a {what} is .toml or .json, not {p.suffix or '(no suffix)'!r}")
    if not p.is_file():
        raise PrismInputError(f"{p}: no such {what}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PrismInputError(f"{p}: cannot read it ({exc})") from None
    try:
        if p.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            return tomllib.loads(text)
        return jsontext.loads(text, str(p))
    except PrismInputError:
        raise  # said already, naming the file
    except (ValueError, RecursionError) as exc:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise PrismInputError(f"{p}: not valid {p.suffix[1:].upper()} ({brief(exc)})") from None


def chain_from_object(obj: Any, path: Path | None = None) -> ChainSpec:
    """A chain from its parsed form (``path``: the file, whose folder relative paths start from)."""
    import jsonschema

    where = str(path) if path is not None else "chain"
    if isinstance(obj, dict) and isinstance(obj.get("stages"), list):
        graphish = next(
            (i for i, s in enumerate(obj["stages"]) if isinstance(s, dict) and {"inputs", "fusion"} & set(s)), None
        )
        if graphish is not None:
            raise GraphFileAsChain(
                f"{where}: stages.{graphish} (stage {graphish + 1}) names its inputs or is a fusion: "
                "a graph file, not a chain file"
            )
    try:
        jsonschema.validate(obj, SCHEMA)
    except jsonschema.ValidationError as exc:
        raise PrismInputError(f"{where}: {_describe_error(exc)}") from None
    stages = [s for s in stages_from_object(obj["stages"], path) if s is not None]
    if stages[-1].kind != "model":
        raise PrismInputError(f"{where}: the last stage is an adapter; a chain ends with a model")
    base = path.parent if path is not None else Path(".")
    tokenizers = {k: _resolve(base, v) for k, v in obj.get("tokenizers", {}).items()}
    return ChainSpec(path, stages, obj.get("name"), obj.get("target"), tokenizers)


def _resolve(base: Path, text: str) -> Path:
    q = Path(os.path.expanduser(text))
    return q if q.is_absolute() else base / q


def stages_from_object(raw_stages: list[Any], path: Path | None, alternate: bool = True) -> list[StageSpec | None]:
    """Each schema-checked stage as a ``StageSpec`` (None for a graph's fusion stage); with
    ``alternate``, checked to alternate model, adapter, model, ..."""
    where = str(path) if path is not None else "chain"
    base = path.parent if path is not None else Path(".")
    stages: list[StageSpec | None] = []
    for i, raw in enumerate(raw_stages):
        if "model" not in raw and "adapter" not in raw:
            stages.append(None)
            continue
        kind = "model" if "model" in raw else "adapter"
        expected = "model" if i % 2 == 0 else "adapter"
        if alternate and kind != expected:
            raise PrismInputError(
                f"{where}: stages.{i} (stage {i + 1}): a {kind}, but stages alternate model, adapter, "
                "model, ... and start and end with a model"
            )
        name = str(raw.get("name") or Path(raw[kind]).stem or raw[kind])
        if not name.isprintable():  # names are printed and become folder names: no line breaks or escapes
            raise PrismInputError(
                f"{where}: stages.{i} (stage {i + 1}): the name {name!r} holds control characters; "
                "give it a printable name"
            )
        stages.append(
            StageSpec(
                index=i,
                kind=kind,
                path=_resolve(base, raw[kind]),
                name=name,
                target=raw.get("target"),
                precision=Precision(raw["precision"]) if raw.get("precision") else None,
                hf=_resolve(base, raw["hf"]) if "hf" in raw else None,
                reference=_resolve(base, raw["reference"]) if "reference" in raw else None,
                sha256=raw.get("sha256"),
            )
        )
    return stages


def stage_digest(path: Path) -> str | None:
    """What a stage's ``sha256`` covers: a file's bytes, or a folder's ``manifest.json``
    (build) or ``model.json`` (export). None when there is nothing to hash."""
    if path.is_file():
        return file_sha256(path)
    for name in (MANIFEST_NAME, MODEL_JSON):
        if (path / name).is_file():
            return file_sha256(path / name)
    return None


def check_stage_files(spec: ChainSpec, stage: StageSpec) -> None:
    """A stage's files are there and, where the chain file records a sha256, hash as recorded;
    an export folder's graphs hash as its model.json records."""
    where = f"{spec.where()}: {stage.label}"
    if not stage.path.exists():
        raise PrismInputError(f"{where}: {stage.path}: no such file or folder")
    if stage.sha256 is not None:
        digest = stage_digest(stage.path)
        if digest != stage.sha256:
            raise PrismInputError(
                f"{where}: {stage.path}: sha256 {str(digest)[:12]}... does not match the chain "
                f"file's {stage.sha256[:12]}... (changed since the chain was written)"
            )
    if stage.kind == "model" and stage.path.is_dir() and not (stage.path / MANIFEST_NAME).is_file():
        from prism_deploy.format import model_folder

        try:
            model_folder.verify_files(stage.path, model_folder.read_model_json(stage.path))
        except PrismInputError as exc:
            raise PrismInputError(f"{where}: {exc}") from None


def role_at(index: int, count: int) -> str:
    """The role a model stage's place asks for."""
    return "first" if index == 0 else "last" if index == count - 1 else "middle"


def _widths(spec: ChainSpec, stage: StageSpec, count: int) -> tuple[int | None, int | None]:
    """(width in, width out) of a stage from its manifest or header, its role checked; None where
    only the runtime can tell (an exported adapter .onnx) or nothing goes in (a first model)."""
    from prism_deploy.format.engine_manifest import read_manifest, source_kind
    from prism_deploy.format.model_folder import read_model_json

    where = f"{spec.where()}: {stage.label}"
    path = stage.path
    build = read_manifest(path) if path.is_dir() else None
    if stage.kind == "model":
        if not path.is_dir():
            raise PrismInputError(f"{where}: {path}: a file; a model stage is an export-model or build --model folder")
        if build is not None and source_kind(build) != "model":
            raise PrismInputError(f"{where}: {path}: a build of an adapter, where a model belongs")
        role = role_at(stage.index, count)
        try:
            manifest = read_model_json(path, role)
        except PrismInputError as exc:
            raise PrismInputError(f"{where}: {exc}") from None
        hidden = int(manifest["dims"]["hidden"])
        return (None if role == "first" else hidden), (int(manifest["dims"]["vocab"]) if role == "last" else hidden)
    if path.is_dir():
        if build is None:
            if (path / MODEL_JSON).is_file():
                raise PrismInputError(
                    f"{where}: {path}: a model export folder, where an adapter belongs (an adapter "
                    ".safetensors, .onnx or build folder)"
                )
            raise PrismInputError(f"{where}: {path}: a folder without manifest.json (not an adapter build folder)")
        if source_kind(build) != "adapter":
            raise PrismInputError(f"{where}: {path}: a build of a model, where an adapter belongs")
        config = build["adapter"]["config"]
        return int(config["in_dim"]), int(config["out_dim"])
    if path.suffix == ".safetensors":
        from prism_deploy.format.adapter_file import read_adapter_config

        try:
            adapter = read_adapter_config(path)
        except PrismInputError as exc:
            raise PrismInputError(f"{where}: {exc}") from None
        return adapter.in_dim, adapter.out_dim
    return None, None


def check_chain(spec: ChainSpec) -> None:
    """The whole chain fits together before anything is built or loaded: every stage's files
    (:func:`check_stage_files`), each model's role for its place, and each adapter's widths
    against the models beside it. One ``PrismInputError`` naming the first stage that does not."""
    count = len(spec.stages)
    widths = []
    for stage in spec.stages:
        check_stage_files(spec, stage)
        widths.append(_widths(spec, stage, count))
    for i in range(1, count, 2):
        (in_dim, out_dim), before, after = widths[i], spec.stages[i - 1], spec.stages[i + 1]
        for side, have, want, what in (
            ("in_dim", in_dim, widths[i - 1][1], f"the hidden width {{}} of {before.label}"),
            ("out_dim", out_dim, widths[i + 1][0], f"the embedding width {{}} of {after.label}"),
        ):
            if have is not None and want is not None and have != want:
                raise PrismInputError(
                    f"{spec.where()}: {spec.stages[i].label}: {side} {have} does not match " + what.format(want)
                )


def chain_to_object(spec: ChainSpec, relative_to: Path, built: bool = False) -> dict[str, Any]:
    """The chain file's JSON form, paths relative to ``relative_to`` where they lie below it;
    ``built``: marked as ``build --chain``'s own file."""

    def rel(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(relative_to.resolve()))
        except ValueError:
            return str(p.resolve())

    stages = []
    for s in spec.stages:
        item: dict[str, Any] = {s.kind: rel(s.path), "name": s.name}
        for key in ("target", "precision", "sha256"):
            if getattr(s, key) is not None:
                item[key] = getattr(s, key)
        if s.hf is not None:
            item["hf"] = rel(s.hf)
        if s.reference is not None:
            item["reference"] = rel(s.reference)
        stages.append(item)
    obj: dict[str, Any] = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION}
    if built:
        obj["built_by"] = BUILT_BY
    if spec.name:
        obj["name"] = spec.name
    if spec.target:
        obj["target"] = spec.target
    if spec.tokenizers:
        obj["tokenizers"] = {k: rel(v) for k, v in spec.tokenizers.items()}
    obj["stages"] = stages
    return obj


def _describe_error(exc: Any) -> str:
    """One line: the field (as ``stages.2.adapter``, with the stage number) and what is wrong."""
    parts = list(exc.absolute_path)
    field = ".".join(str(p) for p in parts) or "(top level)"
    if len(parts) >= 2 and parts[0] == "stages" and isinstance(parts[1], int):
        field += f" (stage {parts[1] + 1})"
    message = exc.message
    if exc.validator == "oneOf" and isinstance(exc.instance, dict):
        keys = set(exc.instance)
        if {"model", "adapter"} <= keys:
            message = "a stage is a model or an adapter, not both"
        elif not keys & {"model", "adapter"}:
            message = "a stage needs 'model' or 'adapter'"
        else:  # the stage's own schema says exactly what is wrong
            import jsonschema

            kind_schema = exc.schema["oneOf"][0 if "model" in keys else 1]
            inner = next(iter(jsonschema.Draft202012Validator(kind_schema).iter_errors(exc.instance)), None)
            if inner is not None:
                if inner.validator == "additionalProperties":
                    allowed = set(kind_schema["properties"])
                    message = f"unknown key(s) {sorted(keys - allowed)}"
                else:
                    sub = ".".join(str(p) for p in inner.absolute_path)
                    field += f".{sub}" if sub else ""
                    message = inner.message
    return f"{field}: {brief(message)}"
