"""Recording served request text for adaptation (``serve --record DIR``); off unless asked.

What is kept: for a sampled request to the chain's first model (the ensemble ``chain`` and
``generate`` both reach it), the token ids of each row where its attention mask is 1, the
tokenizer that made them (the name of the first model's source folder and its vocabulary size),
the served model's name and the time. Never the outputs, never hidden states. One JSON file per
request in ``DIR``, written under a temporary name and renamed, mode 0600; ``DIR`` is created
0700 and an existing folder that group or others may read is refused.

Sampling: each request is kept with probability ``rate``. Budget: the record files in ``DIR``
are summed (a listing of the folder) when a recorder starts, after every
:data:`RESCAN_WRITES` of its writes, and whenever its own count passes ``budget_bytes``; then
the oldest are deleted until the total is within the budget. Between listings a process adds
its own writes to the sum, so one process keeps the folder within the budget exactly, and
several (one per model instance) overshoot by at most ``RESCAN_WRITES`` records each; a request
does not pay for listing a large folder each time. Only files named as this module names them
are counted or deleted.

The settings reach Triton's Python-backend processes in one environment variable
(:data:`RECORD_VARIABLE`, JSON), which ``serve`` sets only with ``--record`` and clears
otherwise. A failure to record is reported on the server's log and never fails a request.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prism_deploy.core.errors import PrismInputError

RECORD_VARIABLE = "PRISM_DEPLOY_RECORD"
RECORD_FORMAT = "prism-deploy-request-record"
RECORD_VERSION = 1
# <time ns, 20 digits>-<pid>-<random>.json: the name sorts oldest first
RECORD_NAME = re.compile(r"^\d{20}-\d+-[0-9a-f]{8}\.json$")
DEFAULT_BUDGET_BYTES = 64 << 20
RESCAN_WRITES = 32


@dataclass(frozen=True)
class RecordSettings:
    folder: Path
    rate: float = 1.0
    budget_bytes: int = DEFAULT_BUDGET_BYTES

    def to_env(self) -> str:
        return json.dumps({"dir": str(self.folder.resolve()), "rate": self.rate, "budget_bytes": self.budget_bytes})

    @classmethod
    def from_env(cls, text: str) -> RecordSettings:
        obj = json.loads(text)
        return cls(Path(obj["dir"]), float(obj["rate"]), int(obj["budget_bytes"]))


def prepare_folder(folder: str | os.PathLike[str]) -> Path:
    """``folder`` created owner-only (0700), or an existing one that only its owner may enter."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise PrismInputError(f"--record {folder}: not a folder")
    if not path.exists():
        try:
            path.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise PrismInputError(f"--record {folder}: cannot create it ({exc.strerror})") from None
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    info = path.stat()
    if info.st_uid != os.getuid():
        raise PrismInputError(f"--record {folder}: owned by another user; recorded text must stay owner-only")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise PrismInputError(
            f"--record {folder}: group or others may access it (mode "
            f"{stat.S_IMODE(info.st_mode):o}); recorded text must stay owner-only: chmod 700 it"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise PrismInputError(f"--record {folder}: not writable")
    return path


def record_files(folder: Path) -> list[Path]:
    """The record files in ``folder``, oldest first (nothing else in it is counted or touched)."""
    try:
        names = sorted(n for n in os.listdir(folder) if RECORD_NAME.match(n))
    except FileNotFoundError:
        return []
    return [folder / n for n in names]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # dropped meanwhile by another process's budget
        return 0


def enforce_budget(folder: Path, budget_bytes: int) -> int:
    """Delete the oldest record files until the folder's records total at most ``budget_bytes``;
    the total left."""
    files = record_files(folder)
    sizes = [_size(f) for f in files]
    total = sum(sizes)
    for f, size in zip(files, sizes):
        if total <= budget_bytes:
            break
        f.unlink(missing_ok=True)
        total -= size
    return total


class Recorder:
    """Keeps a sample of one model's requests (token ids only) in the record folder."""

    def __init__(
        self, settings: RecordSettings, model: str, tokenizer: str, vocab: int, rng: random.Random | None = None
    ) -> None:
        self.settings = settings
        self.model = model
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.rng = rng or random.Random()
        self.total: int | None = None  # the folder's record bytes as last listed, plus our writes since
        self.writes_since_scan = 0

    def offer(self, ids: np.ndarray, mask: np.ndarray | None) -> Path | None:
        """Record this request with probability ``rate``; the file written, or None."""
        if self.rng.random() >= self.settings.rate:
            return None
        rows = []
        for r in range(ids.shape[0]):
            keep = np.ones(ids.shape[1], dtype=bool) if mask is None else np.asarray(mask[r]) != 0
            rows.append([int(v) for v in ids[r][keep]])
        return self.write(rows)

    def write(self, rows: list[list[int]]) -> Path | None:
        body = json.dumps(
            {
                "format": RECORD_FORMAT,
                "version": RECORD_VERSION,
                "model": self.model,
                "tokenizer": self.tokenizer,
                "vocab": self.vocab,
                "time": time.time(),
                "ids": rows,
            }
        ).encode()
        if len(body) > self.settings.budget_bytes:
            return None  # it would only be dropped again
        folder = self.settings.folder
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}.json"
        tmp = folder / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            os.replace(tmp, folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.writes_since_scan += 1
        if self.total is not None:
            self.total += len(body)
        if self.total is None or self.total > self.settings.budget_bytes or self.writes_since_scan >= RESCAN_WRITES:
            self.total = enforce_budget(folder, self.settings.budget_bytes)
            self.writes_since_scan = 0
        return folder / name


def from_environment(model: str, tokenizer: str, vocab: int) -> Recorder | None:
    """The recorder ``serve --record`` asked for, or None (recording is off unless asked)."""
    text = os.environ.get(RECORD_VARIABLE)
    if not text:
        return None
    return Recorder(RecordSettings.from_env(text), model, tokenizer, vocab)


def read_records(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every readable record in ``folder``, oldest first; a file that is not a record is refused."""
    path = Path(folder)
    if not path.is_dir():
        raise PrismInputError(f"{folder}: no such record folder")
    out = []
    for f in record_files(path):
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue  # dropped by the budget while we read
        except ValueError:
            raise PrismInputError(f"{f}: not a request record (bad JSON)") from None
        if not isinstance(obj, dict) or obj.get("format") != RECORD_FORMAT or not isinstance(obj.get("ids"), list):
            raise PrismInputError(f"{f}: not a request record")
        out.append(obj)
    return out
