"""The command line's one check of where a command writes, made before it does any work.

A command declares its outputs (``declare_outputs(parser, files=("output",))``); ``main``
then refuses, with exit 2 and one line, an output that

- is one of the command's inputs (any other path given on its command line, ``FILE:NAME``
  included): writing it would destroy what is being read;
- is a folder where a file is written (or a file where a folder is), a device, a FIFO or a
  socket, or lies below a regular file;
- cannot be written (a read-only file system, a folder without write permission), so that a
  long fit or collect does not compute for minutes and then fail at the write;
- is named twice (two outputs of one command on one path).
"""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.fsutil import check_writable, refuse_special

# argparse bookkeeping, never paths
_NOT_PATHS = {"func", "command", "needs", "output_files", "output_folders"}


def declare_outputs(
    parser: argparse.ArgumentParser, files: tuple[str, ...] = (), folders: tuple[str, ...] = ()
) -> None:
    """Name the ``dest`` of the options a command writes to: files, or folders it fills."""
    parser.set_defaults(output_files=files, output_folders=folders)


# errors of the place written to, not of what is read: reported against the output
FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def declared_output(args: argparse.Namespace) -> str | None:
    """The first output the user named (file or folder), for errors met while writing it."""
    for dest in (*getattr(args, "output_files", ()), *getattr(args, "output_folders", ())):
        value = getattr(args, dest, None)
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    return None


def check_outputs(args: argparse.Namespace) -> None:
    outputs = [(dest, "file") for dest in getattr(args, "output_files", ())]
    outputs += [(dest, "folder") for dest in getattr(args, "output_folders", ())]
    given = [
        (dest, Path(getattr(args, dest)), kind)
        for dest, kind in outputs
        if isinstance(getattr(args, dest, None), (str, os.PathLike))
    ]
    inputs = list(_input_paths(args, {dest for dest, _ in outputs}))
    for i, (dest, path, kind) in enumerate(given):
        for _dest2, other, _kind2 in given[:i]:
            if _same(path, other):
                raise PrismInputError(f"{path}: named as two outputs of one command")
        refuse_overlap(path, inputs, kind)
        check_writable(path, kind)


def refuse_overlap(path: Path, inputs: Iterable[str | os.PathLike[str]], kind: str = "file") -> None:
    """Refuse ``path`` as an output when it is one of ``inputs``, or would replace a file inside
    an input folder, or lies inside a folder prism-deploy owns (a build or export folder:
    anything else there makes the next build or export refuse it). Commands whose inputs come
    from a file (a chain file's stages) call this with them once they are known."""
    sources = [Path(s) for s in inputs]
    for source in sources:
        if _same(path, source):
            also = "" if os.fspath(source) == os.fspath(path) else f" (as {source})"
            raise PrismInputError(
                f"{path}: is also an input of this command{also}; writing it would destroy it; give another output path"
            )
    refuse_special(path, kind)  # a device or FIFO is said as such, wherever it is
    for source in sources:
        if source.is_dir() and _within(path, source):
            if os.path.lexists(path):
                raise PrismInputError(
                    f"{path}: is inside {source}, an input of this command; writing it would "
                    "replace a file the command reads; give another output path"
                )
            if any((source / name).is_file() for name in owned_markers()):
                raise PrismInputError(
                    f"{path}: is inside {source}, a folder prism-deploy wrote (an input here); give a path outside it"
                )


def owned_markers() -> tuple[str, ...]:
    """The files that make a folder a build, export or serving repository folder: only the tool's
    own files go there. Their names' homes load the format package, so only when asked."""
    from prism_deploy.format.engine_manifest import MANIFEST_NAME
    from prism_deploy.format.model_folder import MODEL_JSON

    return MANIFEST_NAME, MODEL_JSON, "prism-repository.json"


def _within(path: Path, folder: Path) -> bool:
    real_folder = os.path.realpath(folder)
    real = os.path.realpath(path)
    return real != real_folder and os.path.commonpath([real, real_folder]) == real_folder


def _input_paths(args: argparse.Namespace, outputs: set[str]) -> Iterator[Path]:
    """Every existing path among the other arguments (``FILE:NAME`` read as ``FILE``)."""
    for dest, value in vars(args).items():
        if dest in outputs or dest in _NOT_PATHS:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            path = _existing(item)
            if path is not None:
                yield path


def _existing(value: Any) -> Path | None:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        return None
    text = os.fspath(value)
    for candidate in (text, text.rpartition(":")[0]):
        if candidate and os.path.lexists(candidate):
            return Path(candidate)
    return None


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
