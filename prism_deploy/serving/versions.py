"""Versions of a served adapter model: rollback, keeping the last K, and the adaptation log.

- :func:`rollback`: ``triton rollback REPO --model NAME [--to VERSION]`` writes the files of an
  earlier version again as the next version (hard links, else copies; filled under a staging name
  and renamed, under the repository's update lock) and asks the server to load it: the same path
  as ``triton update``, so the swap has no failed request. The default target is the version
  before the one served; a version that is itself a rollback counts as the version it restored,
  so two rollbacks in a row go two versions back.
- :func:`prune`: keep the newest K versions; only version folders the manifest lists (the
  repository wrote them) are removed, never the newest, and with them the adapter files
  ``adapt`` wrote for them (``NAME/.adapted/``) that no kept version was built from.
- The adaptation log (``REPO/prism-adapt-log.json``, one JSON list, rewritten by temporary file
  and rename under the update lock) and each adapter's round lock
  (``REPO/.prism-adapt-<model>.lock``: a second round on one adapter is refused, not queued).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prism_deploy.core.errors import PrismInputError
from prism_deploy.format.engine_manifest import MANIFEST_NAME
from prism_deploy.serving import repository as repo_mod
from prism_deploy.serving.update import UPDATE_LOCK, server_endpoint, swap, versions_of

ADAPT_LOG = "prism-adapt-log.json"  # a file at the repository's root: Triton ignores it
ADAPTED_DIR = ".adapted"  # in a model's folder, the adapters `adapt` wrote; not a number: Triton ignores it
DEFAULT_KEEP = 5


def adapter_model(manifest: dict[str, Any], repo: str | os.PathLike[str], model: str | None) -> str:
    """The adapter model ``model`` names (or the only one)."""
    adapters = sorted(n for n, r in manifest["models"].items() if r.get("kind") == "adapter")
    if model is None:
        if len(adapters) != 1:
            raise PrismInputError(f"{repo}: adapter models {', '.join(adapters) or 'none'}; name one with --model")
        return adapters[0]
    if model not in adapters:
        raise PrismInputError(f"--model {model}: not an adapter model of {repo} ({', '.join(adapters) or 'none'})")
    return model


def model_dir(root: Path, model: str) -> Path:
    from prism_deploy.core.fsutil import inside

    return inside(root, model, f"{root / repo_mod.REPO_MANIFEST}: models")


@contextmanager
def round_lock(root: Path, model: str) -> Iterator[None]:
    """One adaptation round per adapter at a time: a second is refused at once (exit 2)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(root / f".prism-adapt-{model}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise PrismInputError(
            f"{root}: an adaptation round on {model} is running already; nothing was changed"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def origin_of(record: dict[str, Any], version: int) -> int:
    """The version whose files ``version`` holds (itself, unless it was written by a rollback)."""
    return int(record.get("restored_from", {}).get(str(version), version))


def rollback(
    repo: str | os.PathLike[str],
    model: str | None = None,
    *,
    to: int | None = None,
    url: str | None = None,
    load: bool = True,
    keep: int = DEFAULT_KEEP,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from prism_deploy.core.fsutil import folder_lock

    root = Path(repo)
    repo_mod.read_manifest(root)
    with folder_lock(root, UPDATE_LOCK, log):
        manifest = repo_mod.read_manifest(root)
        model = adapter_model(manifest, repo, model)
        record = manifest["models"][model]
        mdir = model_dir(root, model)
        versions = versions_of(mdir)
        if not versions:
            raise PrismInputError(f"{mdir}: no version folders")
        served = versions[-1]
        if to is None:
            earlier = [v for v in versions if v < origin_of(record, served)]
            if not earlier:
                raise PrismInputError(
                    f"{repo}: {model} version {served} has no earlier version kept "
                    f"(kept: {', '.join(map(str, versions))})"
                )
            to = earlier[-1]
        if to not in versions:
            raise PrismInputError(f"--to {to}: {model} keeps versions {', '.join(map(str, versions))}")
        if to == served:
            raise PrismInputError(f"--to {to}: that version is the one served")
        source = mdir / str(to)
        new = served + 1
        vdir = repo_mod.add_version(root, model, new, lambda staging: _fill_from(source, staging))
        record["versions"] = sorted({*record.get("versions", []), new})
        sources = record.setdefault("sources", {})
        if str(to) in sources:
            sources[str(new)] = sources[str(to)]
        record.setdefault("restored_from", {})[str(new)] = origin_of(record, to)
        record["adapter_sha256"] = version_adapter_sha256(mdir, to)
        repo_mod.write_manifest(root, manifest)
    report: dict[str, Any] = {
        "repository": str(root),
        "model": model,
        "version": new,
        "version_dir": str(vdir),
        "restored": to,
        "previous": served,
        "server": None,
    }
    endpoint, headers = server_endpoint(root, url)
    if load and endpoint is not None:
        report["server"] = swap(endpoint, model, new, headers=headers)
    report["removed"] = prune(root, model, keep, log)
    return report


def version_adapter_sha256(mdir: Path, version: int) -> str | None:
    """The sha256 of the adapter file a (Python-form) version was built from, from its build manifest."""
    from prism_deploy.core.jsontext import load_file
    from prism_deploy.serving.stage_runtime import STAGE_DIR

    path = mdir / str(version) / STAGE_DIR / MANIFEST_NAME
    if not path.is_file():
        return None
    adapter = load_file(path).get("adapter")
    return str(adapter["sha256"]) if isinstance(adapter, dict) and "sha256" in adapter else None


def _fill_from(source: Path, staging: Path) -> None:
    for entry in os.scandir(source):
        target = staging / entry.name
        if entry.is_symlink():
            raise PrismInputError(f"{entry.path}: a link in a version folder; refusing to restore it")
        if entry.is_dir():
            shutil.copytree(entry.path, target, copy_function=_link_or_copy, symlinks=False)
        else:
            _link_or_copy(entry.path, str(target))


def prune(root: Path, model: str, keep: int, log: Callable[[str], None] | None = None) -> list[int]:
    """Remove the versions older than the newest ``keep`` that the manifest lists; the removed."""
    from prism_deploy.core.fsutil import folder_lock

    if keep < 1:
        raise PrismInputError(f"--keep: {keep} must be at least 1")
    removed = []
    with folder_lock(root, UPDATE_LOCK, log):
        manifest = repo_mod.read_manifest(root)
        record = manifest["models"][model]
        mdir = model_dir(root, model)
        versions = versions_of(mdir)
        listed = {int(v) for v in record.get("versions", [])}
        for v in versions[:-keep]:
            if v in listed:
                # renamed out of the version space first: Triton never sees a half-deleted version
                gone = mdir / f"{repo_mod.STAGING_PREFIX}removed-{v}"
                os.replace(mdir / str(v), gone)
                shutil.rmtree(gone)
                removed.append(v)
        if removed:
            record["versions"] = sorted(listed - set(removed))
            sources = record.get("sources", {})
            gone_sources = {sources.pop(str(v), None) for v in removed} - set(sources.values()) - {None}
            repo_mod.write_manifest(root, manifest)
            # the adapter files `adapt` wrote for the removed versions (its own folder), if no kept version uses them
            adapted = (mdir / ADAPTED_DIR).resolve()
            for source in gone_sources:
                path = Path(str(source))
                if path.parent == adapted and path.suffix == ".safetensors":
                    path.unlink(missing_ok=True)
    return removed


def read_log(repo: str | os.PathLike[str]) -> list[dict[str, Any]]:
    from prism_deploy.core.jsontext import load_file

    path = Path(repo) / ADAPT_LOG
    if not path.exists():
        return []
    rounds = load_file(path)
    if not isinstance(rounds, list):
        raise PrismInputError(f"{path}: not an adaptation log (a JSON list)")
    return rounds


def append_log(repo: str | os.PathLike[str], entry: dict[str, Any], log: Callable[[str], None] | None = None) -> int:
    """Add one round's record (temporary file and rename, under the update lock); its number."""
    from prism_deploy.core.fsutil import folder_lock, write_text_atomic
    from prism_deploy.core.jsontext import dumps

    root = Path(repo)
    with folder_lock(root, UPDATE_LOCK, log):
        rounds = read_log(root)
        entry = {"round": len(rounds) + 1, **entry}
        rounds.append(entry)
        write_text_atomic(root / ADAPT_LOG, dumps(rounds, indent=1) + "\n")
    return int(entry["round"])
