"""The project's three kinds of failure, which the CLI maps to exit codes.

- ``PrismInputError``: the user's input is wrong (bad file, bad option). Exit 2 with one
  ``error: ...`` line.
- ``CheckFailed``: the input was fine but a check (parity, a tolerance) did not pass. Exit 1.
- ``OutputError``: the input was fine but an output could not be written (a full disk, a
  read-only place, no permission). Exit 3 with one ``error: cannot write PATH: ...`` line: the
  same command succeeds once there is room or permission, so it is not bad input.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` as it may reach a terminal: names read from files (stage, pipe, tensor names)
    can hold newlines or escape sequences, which are shown escaped, never acted on."""
    return text if text.isprintable() else repr(text)[1:-1]


class PrismInputError(ValueError):
    """Bad input: a file, a tensor, a config key or an option. The message names it."""

    def __init__(self, message: str) -> None:
        # One line only, control characters escaped: the CLI prints it after "error: ", and a name
        # read from a file must not forge a line of its own.
        super().__init__(printable(" ".join(str(message).split())))


def brief(text: object, limit: int = 200) -> str:
    """``text`` (a library's error message, say) on one line, at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class AdapterFormatError(PrismInputError):
    """An adapter file that does not follow format v1 (docs/adapter-format.md)."""


class OutputError(Exception):
    """An output could not be written: the place refused it, not the input (exit code 3). The
    message is one line, control characters escaped, as ``PrismInputError``'s."""

    def __init__(self, message: str) -> None:
        super().__init__(printable(" ".join(str(message).split())))


class WriteError(OutputError):
    """A write the file system refused (full, read-only, name too long...). ``reason`` is what
    it said; an enclosing ``core.fsutil.write_errors`` re-raises it naming its own, outer path,
    so the user sees the output they named, not a temporary file inside it."""

    def __init__(self, path: object, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"cannot write {path}: {reason}")


class GraphFileAsChain(PrismInputError):
    """A graph file (a stage names its inputs or is a fusion) read as a chain file. The message
    says what it is; the command that read it knows what to suggest instead (``--graph`` where it
    has that option), so the CLI adds that, not the reader."""


class CheckFailed(RuntimeError):
    """A check ran and did not pass (exit code 1)."""


class MissingDependency(PrismInputError):
    """An optional library a command needs is not installed (exit 2, one line saying what to install)."""


# What each optional library is installed with (pyproject.toml extras).
INSTALL_HINTS = {
    "torch": "pip install torch (the CPU build: pip install torch --index-url https://download.pytorch.org/whl/cpu)",
    "transformers": "pip install 'prism-deploy[compile]'",
    "onnxruntime": "pip install 'prism-deploy[ort]' (or [ort-gpu])",
    "gguf": "pip install 'prism-deploy[gguf]'",
}


def require(module: str, what: str) -> None:
    """Raise ``MissingDependency`` unless ``module`` is installed; ``what`` says what needs it.

    Looks the module up without importing it (importing PyTorch alone takes seconds)."""
    import importlib.util
    import sys

    try:
        found = (
            sys.modules[module] is not None if module in sys.modules else importlib.util.find_spec(module) is not None
        )
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingDependency(
            f"{what} needs {module}, which is not installed here; {INSTALL_HINTS.get(module, f'pip install {module}')}"
        )


def require_torch(what: str) -> None:
    require("torch", what)
