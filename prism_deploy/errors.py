"""The project's two kinds of failure, which the CLI maps to exit codes.

- ``PrismInputError``: the user's input is wrong (bad file, bad option). Exit 2 with one
  ``error: ...`` line.
- ``CheckFailed``: the input was fine but a check (parity, a tolerance) did not pass. Exit 1.
"""

from __future__ import annotations


class PrismInputError(ValueError):
    """Bad input: a file, a tensor, a config key or an option. The message names it."""

    def __init__(self, message: str) -> None:
        # One line only: the CLI prints it after "error: ".
        super().__init__(" ".join(str(message).split()))


class AdapterFormatError(PrismInputError):
    """An adapter file that does not follow format v1 (docs/adapter-format.md)."""


class CheckFailed(RuntimeError):
    """A check ran and did not pass (exit code 1)."""
