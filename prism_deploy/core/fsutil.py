"""Writing files so that a crash or an error never leaves a half-written output."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prism_deploy.core.errors import PrismInputError, WriteError

# The errors a write can meet that are about where it writes (not about what it reads).
_WRITE_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EISDIR,
    errno.ETXTBSY,
    errno.EIO,
}
# file-name limit of every common Linux file system (bytes); temporary names stay within it
NAME_MAX = 255


@contextlib.contextmanager
def write_errors(path: str | os.PathLike[str], *own: str | os.PathLike[str]) -> Iterator[None]:
    """Report an ``OSError`` met while writing ``path`` (or ``own``: its temporary files, its
    folder) as a ``WriteError`` naming ``path``, the user's name, never a temporary one."""
    try:
        yield
    except WriteError as exc:  # met by a write nested inside this one: said of this, outer, path
        raise WriteError(path, exc.reason) from None
    except OSError as exc:
        names = {os.fspath(path), *(os.fspath(o) for o in own), os.fspath(Path(path).parent)}
        if exc.filename is None or os.fspath(exc.filename) in names or exc.errno in _WRITE_ERRNOS:
            raise WriteError(path, exc.strerror or str(exc)) from exc
        raise


def temp_sibling(target: Path, token: str | None = None, suffix: str = ".tmp") -> Path:
    """A hidden name in ``target``'s folder, unique to this call, within ``NAME_MAX`` bytes
    even when ``target``'s own name is close to the limit."""
    token = token or secrets.token_hex(4)
    room = NAME_MAX - len(f"..{token}{suffix}".encode())
    stem = target.name.encode()[:room].decode("utf-8", "ignore")
    return target.with_name(f".{stem}.{token}{suffix}")


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file under the user's umask."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the same folder so that the final ``os.replace`` is an
    atomic rename on the same file system. On any exception the temporary file is removed
    and ``path`` is left as it was (absent, or its previous content). The file gets the mode
    the user's umask gives (writers that replace the temporary file, such as safetensors',
    would otherwise leave mkstemp's 0600), or ``mode`` when given (0o600: a secret, owner-only
    from its first byte). Write errors name ``path``.
    """
    target = output_path(path)
    tmp = temp_sibling(target)
    with write_errors(path, tmp):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        try:
            yield tmp
            # a writer may have made it executable (a compiled program): keep that, as umask says
            executable = os.stat(tmp).st_mode & 0o111 and 0o777 & ~_umask() & 0o111
            os.chmod(tmp, mode if mode is not None else new_file_mode() | executable)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise


def output_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a file to be written, checked before anything is written: a folder, a
    device, a FIFO or a socket at ``path`` is refused (a write would replace the node, or
    block), as is a path below a regular file; the folder is created."""
    target = Path(path)
    refuse_special(target, "file")
    with write_errors(path):
        target.parent.mkdir(parents=True, exist_ok=True)
    return target


def refuse_special(target: Path, kind: str) -> None:
    """Refuse to write ``kind`` ("file" or "folder") at ``target`` when something else is
    there, or when a parent of it is not a folder. Nothing is created."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        st = None
    except OSError as exc:
        raise WriteError(target, exc.strerror or str(exc)) from exc
    if st is not None:
        if kind == "file" and stat.S_ISDIR(st.st_mode):
            raise PrismInputError(f"{target}: is a folder; give a file name to write")
        if kind == "folder" and not stat.S_ISDIR(st.st_mode):
            raise PrismInputError(f"{target}: is not a folder")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            what = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
            raise PrismInputError(f"{target}: is {what}, not a file; refusing to write over it")
        return
    for parent in target.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise PrismInputError(f"{target}: cannot write: {parent} is a file, not a folder")
            return


def check_writable(target: Path, kind: str) -> None:
    """Refuse ``target`` before any work when it cannot be written: see :func:`refuse_special`,
    plus a nearest existing folder that does not take a new file. That is asked of the file
    system with a real (hidden, at once removed) probe file, not ``os.access``: root passes
    permission bits but not a read-only mount or ``/proc``, and ACLs and quotas count."""
    refuse_special(target, kind)
    folder = target if kind == "folder" and target.is_dir() else target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    probe = folder / f".prism-deploy-probe.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        why = "read-only file system" if _read_only(folder) else (exc.strerror or str(exc))
        raise WriteError(target, f"{why} ({folder})") from None
    with contextlib.suppress(OSError):
        probe.unlink()


@contextlib.contextmanager
def folder_lock(directory: Path, name: str, log: Any = None) -> Iterator[None]:
    """Hold a lock on ``directory`` while writing into it: a second writer says it is waiting
    (through ``log``) and waits, instead of mixing its files with ours.

    On POSIX the folder itself is locked (``flock`` on its descriptor), so no lock file is left
    in every output folder; elsewhere ``directory/name`` is a lock file. Not re-entrant: a
    process holds one lock per folder at a time."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None  # type: ignore[assignment]
    if fcntl is not None:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if log is not None:
                    log(f"waiting for another command writing into {directory} to finish")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock
        return
    from filelock import FileLock, Timeout

    lock = FileLock(str(directory / name))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if log is not None:
            log(f"waiting for another command writing into {directory} to finish")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def check_free_space(target: str | os.PathLike[str], need_bytes: int) -> None:
    """Refuse a write of about ``need_bytes`` when the file system that would hold ``target``
    has less free space (checked before a long computation, not at its end)."""
    from prism_deploy.core.units import human_bytes

    folder = Path(target).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need_bytes:
        raise WriteError(target, f"about {human_bytes(need_bytes)} is needed and {folder} has {human_bytes(free)} free")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    with atomic_output(path, mode) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str, mode: int | None = None) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), mode)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (engines and weights can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# a plain file name (no folder, not "." or "..", no NUL): what every manifest's file fields must be
PLAIN_FILE_NAME = r"^(?!\.\.?$)[^/\\\x00]+$"


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
