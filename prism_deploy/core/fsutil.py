"""Writing files so that a crash or an error never leaves a half-written output."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prism_deploy.core.errors import PrismInputError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the same folder so that the final ``os.replace`` is an
    atomic rename on the same file system. On any exception the temporary file is removed
    and ``path`` is left as it was (absent, or its previous content).
    """
    target = output_path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); give it the mode a plain open() would have.
    os.chmod(tmp_name, 0o666 & ~_umask())
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def output_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a file to be written: its folder is created; a folder at ``path`` itself is
    bad input (said now, in its own words, rather than by a failed rename of a temporary file)."""
    target = Path(path)
    if target.is_dir():
        raise PrismInputError(f"{path}: is a folder; give a file name to write")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (engines and weights can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inside(directory: str | os.PathLike[str], name: object, what: str) -> Path:
    """``directory / name`` for a file name read from a manifest, refused unless it stays inside
    ``directory``: a plain file name (no folders, no ``..``, not absolute) whose real path,
    symlinks resolved, is in the folder's real path. ``what`` names the manifest field."""
    base = Path(directory)
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise PrismInputError(f"{what}: {name!r} is not a plain file name inside {base}")
    path = base / name
    real_base = os.path.realpath(base)
    if os.path.commonpath([real_base, os.path.realpath(path)]) != real_base:
        raise PrismInputError(f"{what}: {name!r} leads outside {base} (a symlink out of the folder)")
    return path
