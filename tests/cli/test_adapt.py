"""Online adaptation: recording served requests, the adapt round's decision and refusals, rollback.

In process, no server: the recorder as the backend calls it, the `adapt` round on the tiny test
models (tests/conftest.py's zoo) with a repository written without a server, and `triton rollback`.
"""

from __future__ import annotations

import argparse
import os
import random
import stat
from pathlib import Path

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


def test_budget_with_two_processes_recording_into_one_folder(tmp_path):
    """Each recorder lists the folder every RESCAN_WRITES writes, not on every request: two of them
    (two model instances) overshoot by at most that many records each, never more."""
    folder = record.prepare_folder(tmp_path / "rec")
    budget = 3000
    recs = [
        record.Recorder(record.RecordSettings(folder, budget_bytes=budget), "first", "llama", 300) for _ in range(2)
    ]
    sizes = []
    for i in range(150):
        written = recs[i % 2].write([list(range(i, i + 10))])
        sizes.append(written.stat().st_size)
        total = sum(f.stat().st_size for f in record.record_files(folder))
        assert total <= budget + 2 * record.RESCAN_WRITES * max(sizes)
    recs[0].total = None  # the next write lists the folder again
    recs[0].write([[1]])
    assert sum(f.stat().st_size for f in record.record_files(folder)) <= budget


def test_record_is_refused_where_no_request_text_arrives():
    from prism_deploy.cli.serve_cmd import _check_recordable

    chain = {"backend": "python", "models": {"first": {"kind": "first"}, "adapter": {"kind": "adapter"}}}
    _check_recordable(chain, "repo")
    with pytest.raises(PrismInputError, match="native form"):
        _check_recordable({**chain, "backend": "native"}, "repo")
    with pytest.raises(PrismInputError, match="no first model"):
        _check_recordable({"backend": "python", "models": {"adapter": {"kind": "adapter"}}}, "repo")


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


# ---------------------------------------------------------------------------------------------
# The adaptation round, in process (no server: versions are written, not loaded)

from prism_deploy.cli.main import main  # noqa: E402
from tests.adapt_helpers import fitted_on_prose, prose_and_code, record_texts  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A fitted adapter (Llama 64 -> Qwen2 96, 8 workers) on prose, served alone (version 1), and
    recorded traffic of source code."""
    from tests.model_helpers import make_model

    root = tmp_path_factory.mktemp("adapt")
    z: dict = {kind: make_model(kind, root / kind) for kind in ("llama", "qwen2")}
    z.update(fitted_on_prose(root, z["llama"], z["qwen2"]))
    z["repo"] = root / "repo"
    assert main(["triton", str(z["build"]), "-o", str(z["repo"])]) == 0
    z["records"] = record.prepare_folder(root / "records")
    record_texts(z["records"], z["llama"], prose_and_code()[1])
    return z


def test_a_refused_record_folder_is_not_made(served, tmp_path, capsys):
    """serve --record on a repository without a first model made DIR, then refused."""
    folder = tmp_path / "rec"
    ports = ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    assert main(["serve", str(served["repo"]), "--record", str(folder), *ports]) == 2
    assert "serves no first model" in capsys.readouterr().err
    assert not folder.exists()


def _copy(served, tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(served["repo"], repo)
    return repo


def _tree(folder):
    """Every file under ``folder`` with its bytes' hash (what a refusal must leave alone)."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def _adapt(served, repo, *extra, records=None):
    return main(
        [
            "adapt",
            str(repo),
            "--from",
            str(records or served["records"]),
            "--model-a",
            str(served["llama"]),
            "--model-b",
            str(served["qwen2"]),
            "--original",
            str(served["pairs"]),
            "--adapter",
            str(served["adapter"]),
            "--max-seq",
            "32",
            "--no-load",
            *extra,
        ]
    )


def test_a_round_goes_live_when_better_and_logs_it(served, tmp_path, capsys):
    import json

    repo = _copy(served, tmp_path)
    assert _adapt(served, repo, "--top", "2", "--margin", "0.2", "--json") == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["decision"] == "live" and entry["version"] == 2
    assert entry["after"]["recorded"] < entry["before"]["recorded"]
    assert entry["after"]["original"] <= entry["before"]["original"] * 1.2
    assert (repo / "adapter" / "2").is_dir()
    manifest = json.loads((repo / "prism-repository.json").read_text())
    assert manifest["models"]["adapter"]["sources"]["2"] == entry["new_adapter"]
    assert entry["adapter"] == str(served["adapter"].resolve())
    assert main(["adapt", str(repo), "--log", "--json"]) == 0
    [logged] = json.loads(capsys.readouterr().out)["rounds"]
    assert logged["round"] == 1 and logged["version"] == 2 and logged["data"]["texts"] == entry["data"]["texts"]
    assert main(["adapt", str(repo), "--log"]) == 0
    assert "live" in capsys.readouterr().out
    # rolled back, keeping one version: version 2 goes, and the adapter file adapt wrote for it
    new_file = Path(entry["new_adapter"])
    assert new_file.is_file() and new_file.parent.name == ".adapted"
    assert main(["triton", "rollback", str(repo), "--no-load", "--keep", "1"]) == 0
    assert sorted(p.name for p in (repo / "adapter").iterdir() if p.name.isdigit()) == ["3"]
    assert not new_file.exists() and served["adapter"].is_file()


def test_the_gate_refuses_what_harms_the_original_set(served, tmp_path, capsys):
    import json

    repo = _copy(served, tmp_path)
    before = _tree(repo)
    assert _adapt(served, repo, "--top", "4", "--margin", "0", "--json") == 1
    entry = json.loads(capsys.readouterr().out)
    assert entry["decision"] == "refused" and entry["version"] is None
    assert all(not c["passes"] for c in entry["candidates"])
    assert any("original set" in c["why"] for c in entry["candidates"])
    after = _tree(repo)
    assert after.pop("prism-adapt-log.json") and after == before  # only the log changed


@pytest.mark.parametrize("case", ["one-text", "too-few", "rank-deficient"])
def test_degenerate_data_stops_in_one_line_and_changes_nothing(served, tmp_path, capsys, case):
    repo = _copy(served, tmp_path)
    before = _tree(repo)
    folder = record.prepare_folder(tmp_path / "rec")
    _, code = prose_and_code()
    record_texts(
        folder,
        served["llama"],
        {"one-text": [code[0]] * 20, "too-few": code[:3], "rank-deficient": code[:12]}[case],
        per_request=1,
    )
    extra = ["--pool", "last", "--min-texts", "2"] if case == "rank-deficient" else []
    assert _adapt(served, repo, *extra, records=folder) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nothing was changed" in err[0]
    assert {"one-text": "same text", "too-few": "fewer than --min-texts", "rank-deficient": "rank-deficient"}[
        case
    ] in err[0]
    assert _tree(repo) == before


def test_records_of_another_tokenizer_are_refused(served, tmp_path, capsys):
    repo = _copy(served, tmp_path)
    before = _tree(repo)
    folder = record.prepare_folder(tmp_path / "rec")
    rec = record.Recorder(record.RecordSettings(folder), "first", "gpt2", 300)
    for i in range(10):
        rec.write([[i, i + 1, i + 2]])
    assert _adapt(served, repo, records=folder) == 2
    assert "recorded with tokenizer gpt2" in capsys.readouterr().err
    assert _tree(repo) == before


def test_two_rounds_on_one_adapter_never_run_at_once(served, tmp_path, capsys):
    from prism_deploy.serving.versions import round_lock

    repo = _copy(served, tmp_path)
    before = _tree(repo)
    with round_lock(repo, "adapter"):
        assert _adapt(served, repo, "--top", "2", "--margin", "0.2") == 2
    assert "running already" in capsys.readouterr().err
    assert _tree(repo) == before


def test_a_round_interrupted_in_its_build_leaves_the_repository_as_it_was(served, tmp_path, monkeypatch, capsys):
    import json

    import prism_deploy.parity.build_checks as engines

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    repo = _copy(served, tmp_path)
    before = _tree(repo)
    monkeypatch.setattr(engines, "adapter_engine_check", interrupted)
    assert _adapt(served, repo, "--top", "2", "--margin", "0.2") == 130
    after = _tree(repo)
    log = json.loads(after.pop("prism-adapt-log.json") and (repo / "prism-adapt-log.json").read_text())
    assert after == before  # no version, no staging folder, no adapter file left behind
    assert [r["decision"] for r in log] == ["failed"]


def test_every_runs_a_round_when_enough_records_are_new(served, tmp_path, capsys):
    from prism_deploy.serving.versions import read_log

    repo = _copy(served, tmp_path)
    assert _adapt(served, repo, "--top", "2", "--margin", "0.2", "--every", "1", "--min-new", "8", "--rounds", "1") == 0
    assert [r["decision"] for r in read_log(repo)] == ["live"]
    assert _adapt(served, repo, "--rounds", "1") == 2  # only with --every
    assert "need --every" in capsys.readouterr().err


def test_decide():
    from prism_deploy.fit.adapt import Candidate, decide

    def judged(rec, orig, margin=0.1):
        c = Candidate("worst", [], {}, recorded=rec, original=orig)
        decide(0.5, 0.4, c, margin)
        return c.passes

    assert judged(0.45, 0.44)  # better on recorded, original within 10 %
    assert not judged(0.45, 0.441)  # original beyond the margin
    assert not judged(0.5, 0.3)  # not better on the recorded text
    assert not judged(float("nan"), 0.3)


# ---------------------------------------------------------------------------------------------
# triton rollback


def test_rollback_restores_the_previous_files_exactly_and_keeps_k(served, tmp_path, capsys):
    import json

    from prism_deploy.reference import random_adapter, simple_config

    repo = _copy(served, tmp_path)
    other = tmp_path / "other.safetensors"
    random_adapter(simple_config(64, 96, (4, 2)), seed=7).save(other)
    assert main(["triton", "update", str(repo), "--adapter", str(other), "--no-load"]) == 0  # v2
    v1, v2 = _tree(repo / "adapter" / "1"), _tree(repo / "adapter" / "2")
    assert v1 != v2
    capsys.readouterr()
    assert main(["triton", "rollback", str(repo), "--no-load", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["version"], report["restored"], report["previous"]) == (3, 1, 2)
    assert _tree(repo / "adapter" / "3") == v1
    # a second rollback goes back past what the first restored: nothing is older than 1
    assert main(["triton", "rollback", str(repo), "--no-load"]) == 2
    assert main(["triton", "rollback", str(repo), "--to", "2", "--no-load", "--keep", "2"]) == 0
    assert sorted(p.name for p in (repo / "adapter").iterdir() if p.name.isdigit()) == ["3", "4"]
    assert _tree(repo / "adapter" / "4") == v2
    manifest = json.loads((repo / "prism-repository.json").read_text())
    assert manifest["models"]["adapter"]["versions"] == [3, 4]
    assert manifest["models"]["adapter"]["restored_from"] == {"3": 1, "4": 2}
