"""Online adaptation: recording served requests, the adapt round's decision and refusals, rollback.

In process, no server: the recorder as the backend calls it, the `adapt` round on the tiny test
models (tests/conftest.py's zoo) with a repository written without a server, and `triton rollback`.
"""

from __future__ import annotations

import argparse
import os
import random
import stat

import numpy as np
import pytest

from prism_deploy.core.errors import PrismInputError
from prism_deploy.serving import record


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_recorder_keeps_only_the_masked_ids_owner_only(tmp_path):
    folder = record.prepare_folder(tmp_path / "rec")
    assert _mode(folder) == 0o700
    rec = record.Recorder(record.RecordSettings(folder), "first", "llama", 300)
    ids = np.array([[5, 6, 7, 0], [9, 8, 0, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.int64)
    written = rec.offer(ids, mask)
    assert written is not None and _mode(written) == 0o600
    [got] = record.read_records(folder)
    assert got["ids"] == [[5, 6, 7], [9, 8]]
    assert (got["tokenizer"], got["vocab"], got["model"]) == ("llama", 300, "first")
    assert set(got) == {"format", "version", "model", "tokenizer", "vocab", "time", "ids"}  # nothing of the outputs
    assert not [n for n in os.listdir(folder) if n.startswith(".")]  # no temporary left


def test_record_folder_open_to_others_is_refused(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir()
    os.chmod(folder, 0o755)
    with pytest.raises(PrismInputError, match="chmod 700"):
        record.prepare_folder(folder)


def test_budget_drops_the_oldest_and_nothing_else(tmp_path):
    folder = record.prepare_folder(tmp_path / "rec")
    (folder / "notes.txt").write_text("the user's own file")
    budget = 2000
    rec = record.Recorder(record.RecordSettings(folder, budget_bytes=budget), "first", "llama", 300)
    first = rec.write([[1, 2, 3]])
    for i in range(60):
        rec.write([list(range(i, i + 20))])
    files = record.record_files(folder)
    assert sum(f.stat().st_size for f in files) <= budget
    assert first not in files and len(files) < 60
    kept = [r["ids"][0][0] for r in record.read_records(folder)]
    assert kept == sorted(kept) and kept[-1] == 59  # the newest are the ones kept, in order
    assert (folder / "notes.txt").read_text() == "the user's own file"


def test_sampling_rate(tmp_path):
    folder = record.prepare_folder(tmp_path / "rec")
    rec = record.Recorder(record.RecordSettings(folder, rate=0.25), "first", "llama", 300, rng=random.Random(3))
    kept = sum(rec.offer(np.array([[1, 2]]), None) is not None for _ in range(400))
    assert 60 < kept < 140


def test_recording_is_off_unless_asked(tmp_path, monkeypatch):
    from prism_deploy.cli.serve_cmd import _recording

    monkeypatch.setenv(record.RECORD_VARIABLE, record.RecordSettings(tmp_path).to_env())  # a stale setting
    args = argparse.Namespace(record=None, record_rate=1.0, record_budget_mb=64.0)
    assert _recording(args) is None
    assert record.from_environment("first", "llama", 300) is None
    args = argparse.Namespace(record=str(tmp_path / "rec"), record_rate=0.5, record_budget_mb=1.0)
    settings = _recording(args)
    assert settings.budget_bytes == 1 << 20
    on = record.from_environment("first", "llama", 300)
    assert on is not None and on.settings == settings
