"""Real text every machine has: the prose of Python's own documentation (``pydoc_data.topics``),
or the user's own file (``--text FILE``), split once, deterministically, into a calibration part
and a held-out part.

One home for the text that validation (export-model on real models), calibration (quantization,
collect) and quality reports read, so that they never see each other's half: calibration fits
on ``calibration``; figures that judge a result are measured on ``held_out``.

Paragraphs are the units: blank-line separated blocks, each joined into one line. From
``pydoc_data.topics`` only prose is kept (indented code, ``>>>`` sessions, headings and
signatures are dropped, and a paragraph repeated in a later topic), and every fifth topic (in sorted topic order) is held out, so the held-out
text is about subjects the calibration text never saw. A user's file is split by paragraph the
same way: every fifth paragraph is held out. The text differs between Python versions: a report
names the corpus by its ``sha256``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prism_deploy.core.errors import PrismInputError

DEFAULT_NAME = "pydoc_data.topics (prose)"
HELD_OUT_EVERY = 5  # every fifth topic (default corpus) or paragraph (a user's file) is held out
_MIN_WORDS = 8


@dataclass(frozen=True)
class Corpus:
    name: str  # "pydoc_data.topics (prose)" or the user's file name
    calibration: tuple[str, ...]
    held_out: tuple[str, ...]
    sha256: str = field(default="")  # of the paragraphs, in order, as UTF-8 joined by blank lines

    def text(self, part: str) -> str:
        """One part (``calibration`` or ``held_out``) as one text, paragraphs joined by blank lines."""
        return "\n\n".join(self.part(part))

    def part(self, part: str) -> tuple[str, ...]:
        if part not in ("calibration", "held_out"):
            raise ValueError(f"corpus part {part!r}: calibration or held_out")
        return self.calibration if part == "calibration" else self.held_out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "calibration_paragraphs": len(self.calibration),
            "held_out_paragraphs": len(self.held_out),
        }


def load(path: str | os.PathLike[str] | None = None) -> Corpus:
    """The user's text file (UTF-8, paragraphs separated by blank lines), else the default corpus."""
    if path is None:
        return default()
    p = Path(path)
    if not p.is_file():
        raise PrismInputError(f"{path}: no such text file")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PrismInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    paragraphs = [" ".join(block.split()) for block in re.split(r"\n\s*\n", raw)]
    paragraphs = [x for x in paragraphs if x]
    if len(paragraphs) < 2:
        # one block (or one text per line): lines are the units
        paragraphs = [x.strip() for x in raw.splitlines() if x.strip()]
    if not paragraphs:
        raise PrismInputError(f"{path}: no text")
    held = tuple(x for i, x in enumerate(paragraphs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1)
    calib = tuple(x for i, x in enumerate(paragraphs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1)
    return Corpus(p.name, calib, held or calib, _digest(paragraphs))


def default() -> Corpus:
    """The prose of ``pydoc_data.topics``, split by topic."""
    from pydoc_data.topics import topics

    calib: list[str] = []
    held: list[str] = []
    seen: set[str] = set()  # topics repeat paragraphs: each is kept once, where it first appears
    for i, key in enumerate(sorted(topics)):
        part = held if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else calib
        for paragraph in prose(topics[key]):
            if paragraph not in seen:
                seen.add(paragraph)
                part.append(paragraph)
    return Corpus(DEFAULT_NAME, tuple(calib), tuple(held), _digest([*calib, *held]))


def prose(doc: str) -> list[str]:
    """The prose paragraphs of one reStructuredText-like topic, each on one line."""
    out = []
    for block in re.split(r"\n\s*\n", doc):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        indents = {len(line) - len(line.lstrip(" ")) for line in lines}
        if len(indents) > 1 or min(indents) > 3:  # code, tables, nested listings
            continue
        text = " ".join(line.strip() for line in lines)
        if text.startswith((">>>", "...", "*", "-", "|", "+")) or re.search(r"[*=~^-]{4,}", text):
            continue
        if not text.endswith((".", ":")) or len(text.split()) < _MIN_WORDS:
            continue  # headings, signatures, fragments
        out.append(text)
    return out


def token_windows(tokenizer: Any, text: str, length: int, count: int) -> list[list[int]]:
    """Up to ``count`` windows of ``length`` consecutive token ids of ``text`` (no special tokens),
    from its start: the same windows on every machine with the same text and tokenizer."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    windows = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    return windows[:count]


def _digest(paragraphs: list[str] | tuple[str, ...]) -> str:
    return hashlib.sha256("\n\n".join(paragraphs).encode("utf-8")).hexdigest()
