"""``build --chain FILE -o OUT``: every stage of a chain built into ``OUT``, and ``OUT/chain.json``.

Each model stage given as an ``export-model`` folder is built as ``build --model`` does into
``OUT/<n>-<name>/``; each adapter stage given as a ``.safetensors`` as ``build ADAPTER`` does;
a stage that is already a build folder is used where it is. Every stage goes through the one
build loop, with the check the caller hands in, so a rebuild reuses each unchanged stage from
its own cache. ``OUT/chain.json`` is a chain file (``prism_deploy.format.chain_file``) naming the
built stage folders, each with the sha256 of its ``manifest.json``; ``run --chain OUT`` and
``parity --chain OUT`` take it. It is written (atomically) only when every stage built.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prism_deploy.builder.adapter_source import BuildRequest, build_engines
from prism_deploy.builder.loop import BuildResult, EngineCheck, check_out_dir, holds_only_leftovers
from prism_deploy.builder.model_source import ModelBuildRequest, build_model_engines
from prism_deploy.builder.options import Profile
from prism_deploy.core.errors import CheckFailed, PrismInputError
from prism_deploy.core.fsutil import write_text_atomic
from prism_deploy.format.chain_file import ChainSpec, StageSpec, chain_to_object, check_chain, stage_digest
from prism_deploy.format.engine_manifest import MANIFEST_NAME

CHAIN_FILE = "chain.json"


@dataclass
class ChainBuildRequest:
    spec: ChainSpec
    out_dir: Path
    target: str | None = None
    profile: Profile = field(default_factory=Profile)
    force: bool = False
    progress: bool = False


@dataclass
class ChainBuildResult:
    directory: Path
    stages: list[tuple[str, BuildResult | None]]  # (stage label, its build; None when used as it is)
    chain_file: Path | None

    def raise_for_failures(self) -> None:
        failed = [(label, r) for label, r in self.stages if r is not None and r.failed]
        if failed:
            raise CheckFailed(
                "; ".join(f"{label}: " + "; ".join(f"{o.id}: {o.detail}" for o in r.failed) for label, r in failed)
                + " (chain.json unchanged; the stage folders "
                "this run made are removed)"
            )


def stage_folder_name(index: int, name: str) -> str:
    return f"{index + 1}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:64]}"


def build_chain(
    request: ChainBuildRequest,
    adapter_check: Callable[[Path], EngineCheck] | None = None,
    model_check: Callable[[Path], EngineCheck] | None = None,
    log: Callable[[str], None] | None = None,
) -> ChainBuildResult:
    """Build every stage (see the module docstring); checks are made per stage by the factories
    given (None: unchecked)."""
    spec, out = request.spec, Path(request.out_dir)
    check_out_dir(out)
    check_chain_out_dir(out, spec, request.force)
    for s in spec.stages:
        if s.kind == "adapter" and s.path.is_file() and s.path.suffix != ".safetensors":
            raise PrismInputError(
                f"{spec.where()}: {s.label}: {s.path}: build --chain builds an adapter from its "
                ".safetensors (or uses a build folder as it is), not from a .onnx"
            )
    check_chain(spec)  # roles, widths and files of every stage, before the first build
    made: list[Path] = [] if out.exists() else [out]  # what this run creates, removed if it fails
    try:
        results, built_paths = _build_stages(request, adapter_check, model_check, log, made)
    except BaseException:
        _remove_made(made)
        raise
    if any(r is not None and r.failed for _, r in results):
        _remove_made(made)
        return ChainBuildResult(out, results, None)
    stages = []
    for s, path in zip(spec.stages, built_paths):
        reference = (
            s.reference if s.reference is not None else (s.path if s.kind == "adapter" and s.path.is_file() else None)
        )
        stages.append(replace(s, path=path, sha256=stage_digest(path), reference=reference))
    obj = chain_to_object(replace(spec, stages=stages), out, built=True)
    chain_file = out / CHAIN_FILE
    text = json.dumps(obj, indent=2) + "\n"
    if not chain_file.is_file() or chain_file.read_text(encoding="utf-8") != text:
        write_text_atomic(chain_file, text)
    return ChainBuildResult(out, results, chain_file)


def _remove_made(made: list[Path]) -> None:
    """Remove the stage folders (and the output folder) this run created: a failed build
    leaves nothing of itself. Folders that were there before keep what their own build left."""
    import shutil

    for folder in reversed(made):
        if folder.is_symlink() or not folder.is_dir():
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _build_stages(
    request: ChainBuildRequest,
    adapter_check: Callable[[Path], EngineCheck] | None,
    model_check: Callable[[Path], EngineCheck] | None,
    log: Callable[[str], None] | None,
    made: list[Path],
) -> tuple[list[tuple[str, BuildResult | None]], list[Path]]:
    spec, out = request.spec, Path(request.out_dir)
    results: list[tuple[str, BuildResult | None]] = []
    built_paths: list[Path] = []
    for s in spec.stages:
        target = request.target or s.target or spec.target or "auto"
        folder = out / stage_folder_name(s.index, s.name)
        if s.path.is_dir() and (s.path / MANIFEST_NAME).is_file():
            results.append((s.label, None))
            built_paths.append(s.path)
            continue
        if not folder.exists() and not folder.is_symlink():
            made.append(folder)
        result = build_stage(spec.where(), s, folder, target, request, adapter_check, model_check, log)
        results.append((s.label, result))
        built_paths.append(folder)
    return results, built_paths


def build_stage(
    where: str,
    s: StageSpec,
    folder: Path,
    target: str,
    request: Any,
    adapter_check: Callable[[Path], EngineCheck] | None,
    model_check: Callable[[Path], EngineCheck] | None,
    log: Callable[[str], None] | None,
) -> BuildResult:
    """One stage built into ``folder``: a model as ``build --model``, an adapter as ``build``."""
    try:
        if s.kind == "model":
            check = model_check(s.path) if model_check is not None else None
            return build_model_engines(
                ModelBuildRequest(
                    model_dir=s.path,
                    out_dir=folder,
                    target=target,
                    profile=request.profile,
                    force=request.force,
                    progress=request.progress,
                ),
                check,
                log,
            )
        check = adapter_check(s.path) if adapter_check is not None else None
        precisions = (s.precision,) if s.precision else None
        return build_engines(
            BuildRequest(
                adapter=s.path,
                out_dir=folder,
                target=target,
                precisions=precisions,
                profile=request.profile,
                force=request.force,
                progress=request.progress,
            ),
            check,
            log,
        )
    except PrismInputError as exc:
        raise PrismInputError(f"{where}: {s.label}: {exc}") from None


def check_chain_out_dir(
    out: Path, spec: Any, force: bool, file_name: str = CHAIN_FILE, built_by: str | None = None
) -> None:
    """``OUT`` holds only what ``build --chain`` writes: stage build folders (each with its
    manifest, whose own rules the stage's build applies) and its own ``chain.json``. Anything
    else is refused unless ``force`` (which keeps it); a ``chain.json`` it did not write (the
    input chain file itself, a user's file) is never replaced."""
    if not out.is_dir():
        return
    chain_file = out / file_name
    if spec.path is not None and chain_file.exists() and chain_file.resolve() == Path(spec.path).resolve():
        raise PrismInputError(f"-o {out}: {chain_file} is the chain file being built; give another output folder")
    for s in spec.stages:  # a link placed at a stage folder's name would take the build elsewhere
        folder = out / stage_folder_name(s.index, s.name)
        if folder.is_symlink():
            raise PrismInputError(
                f"-o {out}: {folder} is a symbolic link; {built_by or 'build --chain'} writes only "
                "into folders it makes (remove the link, or give another output folder)"
            )
    if chain_file.exists() and not _ours(chain_file, built_by):
        raise PrismInputError(
            f"-o {out}: {chain_file} was not written by {built_by or 'build --chain'}; it would be replaced "
            "(move it, or give another output folder)"
        )
    stage_folders = {stage_folder_name(s.index, s.name) for s in spec.stages}
    foreign = sorted(
        p.name
        for p in out.iterdir()
        if p.name != file_name
        and not (p.is_dir() and (p / MANIFEST_NAME).is_file())
        and not (p.name in stage_folders and holds_only_leftovers(p))
    )  # a killed build's stage
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise PrismInputError(
            f"-o {out}: holds files build --chain did not write ({shown}); build into a new or "
            "empty folder, or pass --force (they are kept)"
        )


def _ours(chain_file: Path, built_by: str | None = None) -> bool:
    from prism_deploy.core import jsontext
    from prism_deploy.format.chain_file import BUILT_BY

    try:
        obj = jsontext.load_file(chain_file)
    except PrismInputError:
        return False
    if not isinstance(obj, dict):
        return False
    if obj.get("built_by") == (built_by or BUILT_BY):
        return True
    if built_by is not None:
        return False
    # written before the mark existed: every stage one of this folder's build folders
    stages = obj.get("stages")
    if not isinstance(stages, list):
        return False
    names = [st.get("model", st.get("adapter")) for st in stages if isinstance(st, dict)]
    return (
        bool(names)
        and len(names) == len(stages)
        and all(
            isinstance(n, str) and "/" not in n and (chain_file.parent / n / MANIFEST_NAME).is_file() for n in names
        )
    )


def summary(result: ChainBuildResult) -> list[dict[str, Any]]:
    """Per stage: label, what happened to each engine (or that the folder was used as it was)."""
    rows: list[dict[str, Any]] = []
    for label, r in result.stages:
        if r is None:
            rows.append({"stage": label, "directory": None, "engines": [], "used_as_is": True})
        else:
            rows.append(
                {
                    "stage": label,
                    "directory": str(r.directory),
                    "used_as_is": False,
                    "engines": [{"id": o.id, "action": o.action, "detail": o.detail} for o in r.outcomes],
                }
            )
    return rows
