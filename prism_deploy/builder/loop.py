"""The one build loop: a source's engines into a folder, checked, with a manifest and a cache.

A *source* (an adapter file, :mod:`prism_deploy.builder.adapter_source`; or an ``export-model``
folder, :mod:`prism_deploy.builder.model_source`) says which engines it has (``Unit``s, each one
``EngineConfig`` and so one manifest entry) and how to make each. For every unit, in order:

1. reuse: an entry of the folder's manifest with the same id and cache key (the source's file
   hashes, the configuration, tool versions, device) whose files still hash as recorded;
2. refit (TensorRT ``--refittable`` adapters only): an engine of the same topology has its
   weights replaced instead of being rebuilt;
3. build, then the check the caller passed in (parity against the reference, or against the
   export the graph came from). The builder never runs engines itself: the check is given to
   it, so this layer depends on nothing above it.

Everything is written in a private temporary folder inside DIR, checked there, and only then
moved in under content-addressed names. One commit rule: units of one group (an adapter's
configuration; all graphs of a model, which needs every one of them) land together or not at
all; a failed unit keeps its previous engine. The manifest is replaced atomically last, and
only the files the previous manifest listed and the new one no longer does are deleted: a
build deletes nothing it cannot prove it wrote. A file lock serialises builds into one DIR.

Folder ownership (refused before any work, unless ``force``): a folder that holds another
source's engines, files prism-deploy did not write, or a manifest this version cannot read.
With ``force`` the build goes ahead and still deletes nothing it did not write.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from prism_deploy.builder.options import EngineConfig
from prism_deploy.core import targets
from prism_deploy.core.errors import CheckFailed, PrismInputError
from prism_deploy.core.fsutil import atomic_output, file_sha256, folder_lock, inside, write_errors
from prism_deploy.core.targets import Target
from prism_deploy.format.engine_manifest import (
    ENGINE_SUFFIXES,
    MANIFEST_NAME,
    EngineFileError,
    canonical_hash,
    manifest_path,
    new_manifest,
    part_files,
    parts_intact,
    read_manifest,
    referenced_files,
    source_kind,
    write_manifest,
)
from prism_deploy.target_backends import EngineBuild, TargetBackend

LOCK_NAME = ".build.lock"
TMP_PREFIX = ".build-"
# Files of a build folder that are the builder's own besides what the manifest lists.
OWN_PATTERNS = (MANIFEST_NAME, LOCK_NAME, f".{MANIFEST_NAME}.*.tmp", f"{TMP_PREFIX}*", "timing-*.cache")


@dataclass
class CheckResult:
    """What the check of one built engine found. ``passed`` is None when nothing was checked
    (``figures`` then says why); it is never True without a comparison behind it."""

    passed: bool | None
    figures: dict[str, Any]
    detail: str = ""


# (unit, the folder holding the engine's files, its manifest entry) -> the check's result
EngineCheck = Callable[["Unit", Path, dict[str, Any]], CheckResult]


@dataclass
class Unit:
    """One engine of a source: one configuration, one manifest entry."""

    config: EngineConfig
    sources: dict[str, Any]  # hashes of every input file the engine depends on
    group: str  # units of one group commit together
    topology_key: str | None = None  # same key = same structure (a refit can reuse the engine)
    extra: dict[str, Any] = field(default_factory=dict)  # entry fields the source adds (combine weights)

    @property
    def id(self) -> str:
        return self.config.id


@dataclass
class Outcome:
    """What happened to one unit: ``built``, ``reused``, ``refit`` or ``failed``."""

    unit: Unit
    action: str
    entry: dict[str, Any] | None
    seconds: float
    detail: str = ""

    @property
    def config(self) -> EngineConfig:
        return self.unit.config

    @property
    def id(self) -> str:
        return self.unit.id


@dataclass
class BuildResult:
    directory: Path
    kind: str  # "adapter" or "model"
    label: str  # the adapter file name, or the model's role
    target: str
    target_reason: str
    notes: list[str]
    outcomes: list[Outcome]
    manifest_written: bool

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.action == "failed"]

    def raise_for_failures(self) -> None:
        if self.failed:
            raise CheckFailed(
                "; ".join(f"{o.id}: {o.detail}" for o in self.failed)
                + (" (manifest unchanged)" if not self.manifest_written else "")
            )


class BuildSource(Protocol):
    """What the loop needs from a source (an adapter file or a model folder)."""

    kind: str
    label: str
    record: dict[str, Any]  # the manifest's source section

    def default_out_dir(self) -> Path: ...

    def same_source(self, old: dict[str, Any]) -> bool: ...

    def owns(self, old: dict[str, Any]) -> bool: ...

    def units(self, target: Target) -> list[Unit]: ...

    def make(
        self, unit: Unit, work: Path, directory: Path, refit_from: tuple[Path, dict[str, Any]] | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]: ...

    def refit_source(
        self, unit: Unit, directory: Path, old: dict[str, Any] | None
    ) -> tuple[Path, dict[str, Any]] | None: ...

    def copies(self) -> list[tuple[str, Path]]: ...


@dataclass
class BuildOptions:
    """What every build call takes besides its source."""

    out_dir: Path | None = None
    target: str = "auto"
    check: EngineCheck | None = None
    force: bool = False
    progress: bool = False


def cache_key(unit: Unit, tools: dict[str, Any], device: dict[str, Any]) -> str:
    """Same key = same engine: any change to a source file, the options, the tools or the device rebuilds."""
    return canonical_hash(
        {"sources": unit.sources, "configuration": unit.config.to_json(), "tools": tools, "device": device}
    )


def build(source: BuildSource, options: BuildOptions, log: Callable[[str], None] | None = None) -> BuildResult:
    """Build (or reuse, or refit) every unit of ``source``; see the module docstring."""
    say = log or (lambda message: print(message, file=sys.stderr))
    target, target_reason = targets.resolve_target(options.target)
    units = source.units(target)
    directory = Path(options.out_dir) if options.out_dir is not None else source.default_out_dir()
    tools, device = targets.tool_versions(target), targets.device_info(target)
    notes: list[str] = list(getattr(source, "notes", []))
    created = not directory.exists()
    written = False
    try:
        with write_errors(directory), locked(directory, say):  # a full disk names DIR, not a file in it
            old = _previous_manifest(directory, source, options.force)
            same = old is not None and source.same_source(old)
            old_entries = {e["id"]: e for e in old["engines"]} if old is not None and same else {}
            outcomes: list[Outcome] = []
            work_root = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=directory))
            try:
                for unit in _progress(units, options.progress, source.kind):
                    key = cache_key(unit, tools, device)
                    previous = old_entries.get(unit.id)
                    if (
                        not options.force
                        and previous is not None
                        and previous.get("cache_key") == key
                        and parts_intact(directory, previous)
                    ):
                        outcomes.append(Outcome(unit, "reused", previous, 0.0, "cache hit"))
                        continue
                    refit_from = None if options.force else source.refit_source(unit, directory, old)
                    outcomes.append(
                        _make(source, unit, key, tools, device, work_root, directory, refit_from, options.check)
                    )
                written = _commit(directory, source, old if same else None, old, outcomes, work_root)
            finally:
                shutil.rmtree(work_root, ignore_errors=True)
    finally:
        if created and not written:  # a failed or empty build leaves no folder behind
            _remove_if_only_ours(directory)
    return BuildResult(directory, source.kind, source.label, target.value, target_reason, notes, outcomes, written)


# ---- the folder --------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(directory: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold DIR's build lock; clear temporary files and folders a killed build left behind
    (only those with the builder's own temporary names)."""
    check_out_dir(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrismInputError(f"-o {directory}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PrismInputError(f"-o {directory}: the folder is not writable")
    with folder_lock(directory, LOCK_NAME, log):
        for stale in directory.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in directory.glob(".*.tmp"):
            if _is_own(stale.name):  # atomic_output's temporary names: ".<name>.<8 hex>.tmp"
                stale.unlink(missing_ok=True)
        yield


def check_out_dir(directory: Path) -> None:
    """An output folder must be a folder (or not exist yet): never a file, a device or a FIFO."""
    try:
        mode = os.stat(directory).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise PrismInputError(f"-o {directory}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(mode):
        raise PrismInputError(f"-o {directory}: exists and is not a folder")


def holds_only_leftovers(directory: Path) -> bool:
    """``directory`` holds nothing but what a killed build leaves (its temporary names, an old
    lock file): a rerun builds into it and clears them."""
    try:
        return (
            directory.is_dir()
            and not directory.is_symlink()
            and all(_is_own(p.name) and p.name != MANIFEST_NAME for p in directory.iterdir())
        )
    except OSError:
        return False


def _is_own(name: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(name, pattern) for pattern in OWN_PATTERNS) or bool(_TEMP_NAME.fullmatch(name))


# atomic_output's temporary names (core.fsutil.temp_sibling): ".<name>.<8 hex>.tmp"
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
# engine_part's names: "<stem>.<first 12 hex of the file's sha256><suffix>"
_ENGINE_NAME = re.compile(r".+\.([0-9a-f]{12})(" + "|".join(re.escape(s) for s in ENGINE_SUFFIXES) + ")")


def _orphans(directory: Path, listed: set[str], source: BuildSource) -> list[Path]:
    """Files a killed build moved in before it could list them: engines, whose names carry the
    first 12 hex digits of their own sha256, which the file's content must match (so a user's
    file is never taken for one), the data files such an engine names, and copies of the
    source's files (a model build's model.json, embed_tokens.npy) equal to the source's."""
    found = []
    for name, src in source.copies():
        copy = directory / name
        if name not in listed and copy.is_file() and not copy.is_symlink() and file_sha256(copy) == file_sha256(src):
            found.append(copy)
    for path in directory.iterdir():
        match = _ENGINE_NAME.fullmatch(path.name)
        if (
            match
            and path.name not in listed
            and path.is_file()
            and not path.is_symlink()
            and file_sha256(path).startswith(match.group(1))
        ):
            found.append(path)
            found += [
                directory / name
                for name in _external_data(path)
                if name not in listed and (directory / name).is_file() and "/" not in name
            ]
    return found


def _external_data(engine: Path) -> set[str]:
    """The external-data files an ONNX Runtime engine names (its weights over ~2 GiB)."""
    if not engine.name.endswith(".ort.onnx"):
        return set()
    import onnx

    try:
        model = onnx.load(str(engine), load_external_data=False)
    except Exception:  # not loadable: then it names nothing we could prove ours
        return set()
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


def _previous_manifest(directory: Path, source: BuildSource, force: bool) -> dict[str, Any] | None:
    """The folder's manifest, after the ownership rules (see the module docstring)."""
    try:
        old = read_manifest(directory)
    except EngineFileError as exc:
        if not force:
            raise PrismInputError(
                f"-o {directory}: {exc}; nothing was changed (to build there anyway, "
                "pass --force: the files it lists are kept, not deleted)"
            ) from None
        return None
    listed = referenced_files(old)
    orphans = _orphans(directory, listed, source)  # provably ours, and listed by no manifest
    foreign = sorted(
        p.name for p in directory.iterdir() if p.name not in listed and not _is_own(p.name) and p not in orphans
    )
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise PrismInputError(
            f"-o {directory}: holds files prism-deploy did not write ({shown}); build into a "
            "new or empty folder, or pass --force (they are kept)"
        )
    if old is not None and not source.owns(old) and not force:
        what = describe_source(old)
        raise PrismInputError(
            f"-o {directory}: holds the engines of {what} ({len(old['engines'])} engine(s), "
            f"{len(listed)} file(s)), which this build would replace; use another folder, "
            "or --force to replace them"
        )
    for orphan in orphans:  # the build goes ahead: what a killed one left goes now
        orphan.unlink(missing_ok=True)
    return old


def describe_source(manifest: dict[str, Any]) -> str:
    if source_kind(manifest) == "model":
        return (
            f"a {manifest['model'].get('role')} model build (model.json {manifest['model']['model_json_sha256'][:8]})"
        )
    return f"adapter {manifest['adapter'].get('file')} ({manifest['adapter']['sha256'][:8]})"


def _remove_if_only_ours(directory: Path) -> None:
    """A build that wrote nothing into a folder it created leaves no folder behind."""
    with contextlib.suppress(OSError):
        leftovers = [p for p in directory.iterdir() if p.name != LOCK_NAME]
        if not leftovers:
            (directory / LOCK_NAME).unlink(missing_ok=True)
            directory.rmdir()


def _progress(units: list[Unit], enabled: bool, kind: str) -> Any:
    if not enabled:
        return units
    from tqdm import tqdm

    return tqdm(
        units, desc="build" if kind == "adapter" else "build --model", unit="engine", file=sys.stderr, disable=None
    )  # None: shown on a terminal only


# ---- one unit ----------------------------------------------------------------------------------


def _make(
    source: BuildSource,
    unit: Unit,
    key: str,
    tools: dict[str, Any],
    device: dict[str, Any],
    work_root: Path,
    directory: Path,
    refit_from: tuple[Path, dict[str, Any]] | None,
    check: EngineCheck | None,
) -> Outcome:
    work = Path(tempfile.mkdtemp(prefix=f"{unit.config.slug}.", dir=work_root))
    start = time.perf_counter()
    action = "refit" if refit_from is not None else "built"
    try:
        parts, session = source.make(unit, work, directory, refit_from)
    except CheckFailed as exc:
        return Outcome(unit, "failed", None, time.perf_counter() - start, str(exc))
    seconds = time.perf_counter() - start
    entry: dict[str, Any] = {
        "id": unit.id,
        "configuration": unit.config.to_json(),
        "target": unit.config.target,
        "parts": parts,
        **unit.extra,
        "session": session,
        "tools": tools,
        "device": device,
        "cache_key": key,
        "topology_key": unit.topology_key,
        "build_seconds": round(seconds, 3),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "how": action if refit_from is None else f"refit from {refit_from[0] / refit_from[1]['parts'][0]['file']}",
        "parity": None,
    }
    if check is not None:
        result = check(unit, work, entry)
        entry["parity"] = {**result.figures, "passed": result.passed}
        if result.passed is False:
            return Outcome(unit, "failed", None, seconds, f"parity failed: {result.detail}")
    return Outcome(unit, action, entry, seconds, "cache miss" if refit_from is None else "same topology")


def engine_part(work: Path, stem: str, suffix: str, engine: bytes | Path) -> dict[str, Any]:
    """Move an engine (bytes, or a file in ``work``) to its content-addressed name
    ``<stem>.<sha12><suffix>`` in ``work``; the manifest part record for it."""
    tmp = work / f"{stem}{suffix}.tmp"
    if isinstance(engine, bytes):
        tmp.write_bytes(engine)
    elif engine != tmp:
        engine.rename(tmp)
    digest = file_sha256(tmp)
    name = f"{stem}.{digest[:12]}{suffix}"
    tmp.rename(work / name)
    return {"file": name, "sha256": digest, "bytes": (work / name).stat().st_size}


def build_part(
    backend: TargetBackend, onnx_path: Path, work: Path, stem: str, request: EngineBuild
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``backend`` builds ``onnx_path`` into ``work``: (the manifest's part record, session record)."""
    built = backend.build(onnx_path, work, stem, request)
    part = engine_part(work, stem, built.suffix, built.engine)
    if built.data_file is not None:
        data = work / built.data_file
        part.update(data_file=built.data_file, data_sha256=file_sha256(data), data_bytes=data.stat().st_size)
    return part, built.session


# ---- the commit --------------------------------------------------------------------------------


def _commit(
    directory: Path,
    source: BuildSource,
    kept_from: dict[str, Any] | None,
    old: dict[str, Any] | None,
    outcomes: list[Outcome],
    work_root: Path,
) -> bool:
    """Move the engines of every group that fully succeeded in, refresh the copied files, write
    the manifest; then delete the files the old manifest listed that the new one does not."""
    failed_groups = {o.unit.group for o in outcomes if o.action == "failed"}
    fresh = {
        o.id: o.entry
        for o in outcomes
        if o.action in ("built", "refit") and o.entry is not None and o.unit.group not in failed_groups
    }
    copies = source.copies()
    copy_records = kept_from[source.kind].get("copies", []) if kept_from is not None else []
    copies_intact = (
        kept_from is not None and len(copy_records) == len(copies) and parts_intact(directory, {"parts": copy_records})
    )
    if not fresh and (copies_intact or not copies or failed_groups):
        return False
    moved_in: list[Path] = []
    try:
        _move_in_and_write(directory, source, kept_from, fresh, copies, work_root, moved_in)
    except BaseException:
        # interrupted or failed before the manifest listed them: the engines moved in go again
        # (a name the old manifest lists is the same content, and stays)
        for path in moved_in:
            if path.name not in referenced_files(old):
                with contextlib.suppress(OSError):
                    path.unlink()
        raise
    manifest = read_manifest(directory)
    for name in sorted(referenced_files(old) - referenced_files(manifest)):
        _remove_listed(directory, name)
    return True


def _remove_listed(directory: Path, name: str) -> None:
    """Delete a file an earlier manifest listed, only if it is a plain name of a file inside
    DIR (the schema says so already; a delete is where it must never fail to hold)."""
    try:
        path = inside(directory, name, "manifest file")
    except PrismInputError:
        return
    if path.is_file() and not path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()


def _move_in_and_write(
    directory: Path,
    source: BuildSource,
    kept_from: dict[str, Any] | None,
    fresh: dict[str, dict[str, Any]],
    copies: list[tuple[str, Path]],
    work_root: Path,
    moved_in: list[Path],
) -> None:
    for entry in fresh.values():
        for part in entry["parts"]:
            for name, _ in part_files(part):
                moved = next(work_root.rglob(name))
                moved_in.append(directory / name)
                os.replace(moved, directory / name)
    record = dict(source.record)
    if copies:
        for name, path in copies:
            moved_in.append(directory / name)
            with atomic_output(directory / name) as tmp:
                shutil.copyfile(path, tmp)
        record["copies"] = [
            {"file": n, "sha256": file_sha256(directory / n), "bytes": (directory / n).stat().st_size}
            for n, _ in copies
        ]
    engines: list[dict[str, Any]] = []
    if kept_from is not None:
        # every earlier entry stays (a configuration that failed now keeps its previous engine)
        engines = [fresh.pop(e["id"], e) for e in kept_from["engines"]]
    engines += list(fresh.values())
    write_manifest(directory, new_manifest(record, engines, kind=source.kind))


__all__ = [
    "BuildOptions",
    "BuildResult",
    "BuildSource",
    "CheckResult",
    "EngineCheck",
    "Outcome",
    "Unit",
    "build",
    "cache_key",
    "engine_part",
    "locked",
    "manifest_path",
]
