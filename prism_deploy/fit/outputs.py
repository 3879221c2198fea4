"""Checking, before any computing, that a fit's output file can be written.

``fit`` and ``refit`` compute for minutes and write once, at the end (atomically, through a
temporary file in the output's folder). A folder that is read-only, missing under a regular
file, on a read-only file system or too full used to fail only then. These checks run first
and name the user's path, never the temporary one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from prism_deploy.errors import PrismInputError
from prism_deploy.fit.budget import human_bytes


def check_output_file(path: str | os.PathLike[str]) -> None:
    """``PrismInputError`` unless a file can be created at ``path`` now (its folder exists and
    takes a new file, or can be made in the nearest existing folder)."""
    target = Path(path)
    if target.is_dir():
        raise PrismInputError(f"{path}: is a folder; give a file name to write")
    folder = target.parent
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise PrismInputError(f"{path}: cannot write there: {existing} is not a folder")
    if existing != folder:
        # The folder will be created at the write: its nearest existing ancestor must take it.
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PrismInputError(f"{path}: cannot create the folder {folder}: {existing} is not writable")
        return
    try:
        # A real file, not os.access: it answers as the write will (root bypasses permission
        # bits but not a read-only mount; ACLs and quotas count). Free space is checked apart.
        fd, probe = tempfile.mkstemp(prefix=f".{target.name[:100]}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise PrismInputError(f"{path}: cannot write into {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_free_space(path: str | os.PathLike[str], need_bytes: int) -> None:
    """``PrismInputError`` when the file system of ``path`` has less free space than ``need_bytes``."""
    existing = _nearest_existing(Path(path).parent)
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return
    if free < need_bytes:
        raise PrismInputError(
            f"{path}: the adapter needs about {human_bytes(need_bytes)}, and {existing} has {human_bytes(free)} free"
        )


def _nearest_existing(folder: Path) -> Path:
    probe = folder if str(folder) else Path(".")
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe
