"""What ``fit``, ``refit`` and ``workers`` refuse before computing, and how they report progress.

Issue 17: a mostly-padding layout (``--pipes 3`` on 256 -> 160) ran for 27 minutes at 6.6 GB
with no output; numeric options such as ``--ridge nan`` gave NaN files, tracebacks or hangs;
an unwritable output folder failed only at the write. Each test here fails without its fix.
"""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest

from prism_deploy.cli.main import main
from prism_deploy.core.errors import PrismInputError
from prism_deploy.fit import FitOptions, PairedData, fit_adapter, fit_config, fit_layout, progress
from prism_deploy.fit import budget as budget_mod
from prism_deploy.fit.fitter import fit_work
from prism_deploy.fit.stream import PairedData as StreamData
from prism_deploy.plan import plan_layer3_pipe
from prism_deploy.reference import load_adapter, random_adapter
from tests.fit_data import synthetic_pair


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own exit (bad option values)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def pair(tmp_path):
    x, z, _ = synthetic_pair(600, 40, 30, cond=20, seed=11)
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    np.save(tmp_path / "z.npy", z.astype(np.float32))
    return tmp_path / "x.npy", tmp_path / "z.npy"


@pytest.fixture
def wide_pair(tmp_path):
    """256 -> 160, the shape of the report's reproducer, with few rows."""
    x, z, _ = synthetic_pair(400, 256, 160, cond=10, seed=3)
    np.save(tmp_path / "wx.npy", x.astype(np.float32))
    np.save(tmp_path / "wz.npy", z.astype(np.float32))
    return tmp_path / "wx.npy", tmp_path / "wz.npy"


@pytest.fixture
def no_pass(monkeypatch):
    """Fail the test if any pass over the data starts: 'before computing' means before this."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pass over the data started")

    monkeypatch.setattr(StreamData, "chunks", refuse)


# ---- numeric options: one line at parse time ---------------------------------------------------
BAD_OPTIONS = [
    (["--grid", "100000", "100000"], "--grid"),
    (["--ridge", "nan"], "--ridge"),
    (["--ridge=-inf"], "--ridge"),
    (["--ridge", "-1"], "--ridge"),
    (["--gate-scale", "1e308", "--top-k", "2"], "--gate-scale"),
    (["--gate-scale", "70000", "--top-k", "2"], "--gate-scale"),
    (["--gate-scale", "0", "--top-k", "2"], "--gate-scale"),
    (["--gate-lr", "nan", "--top-k", "2"], "--gate-lr"),
    (["--gate-lr", "inf", "--top-k", "2"], "--gate-lr"),
    (["--holdout", "nan"], "--holdout"),
    (["--holdout", "1.5"], "--holdout"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "1" + "0" * 250], "--seed"),
    (["--rounds", "-1", "--top-k", "2"], "--rounds"),
    (["--gate-steps", "10000000000", "--top-k", "2"], "--gate-steps"),
    (["--workers", "0"], "--workers"),
    (["--workers", "1.5"], "--workers"),
    (["--top-k", "0"], "--top-k"),
    (["--chunk-rows", "0"], "--chunk-rows"),
    (["--threads", "0"], "--threads"),
]


@pytest.mark.parametrize("argv,flag", BAD_OPTIONS, ids=[" ".join(a)[:40] for a, _ in BAD_OPTIONS])
def test_bad_numeric_option_is_one_line_before_any_pass(capsys, pair, tmp_path, no_pass, argv, flag):
    x, z = pair
    out = tmp_path / "never.safetensors"
    code, stdout, err = run_cli(capsys, "fit", "--x", x, "--z", z, "-o", out, *argv)
    assert code == 2 and stdout == ""
    assert flag in one_error_line(err)
    assert not out.exists()


@pytest.mark.parametrize("command", ["refit", "workers"])
def test_refit_and_workers_check_their_numbers_too(capsys, pair, tmp_path, no_pass, command):
    x, z = pair
    adapter = tmp_path / "a.safetensors"
    random_adapter(fit_config(40, 30, grid=(3, 4)), seed=0).save(adapter)
    extra = ["--workers", "1"] if command == "refit" else []
    for bad in (["--ridge", "nan"], ["--seed", "-3"], ["--chunk-rows", "0"], ["--holdout", "nan"]):
        code, _, err = run_cli(capsys, command, adapter, "--x", x, "--z", z, *extra, *bad)
        assert code == 2 and bad[0] in one_error_line(err)


def test_fit_options_check_the_same_ranges_for_library_callers():
    for kw in ({"ridge": float("nan")}, {"gate_lr": float("inf")}, {"seed": -1}, {"rounds": -1}, {"threads": 0}):
        with pytest.raises(PrismInputError, match="--" + next(iter(kw)).replace("_", "-")):
            FitOptions(**kw)
    assert FitOptions(ridge=1e-3).ridge == 1e-3


# ---- layouts that are mostly padding -----------------------------------------------------------
def test_three_pipe_plan_on_a_small_map_is_refused_with_the_numbers(capsys, wide_pair, tmp_path, no_pass):
    x, z = wide_pair
    out = tmp_path / "a.safetensors"
    code, _, err = run_cli(capsys, "fit", "--x", x, "--z", z, "-o", out, "--pipes", 3, "--top-k", 8)
    line = one_error_line(err)
    assert code == 2 and not out.exists()
    # says which pipes, how much padding, how big, and which flag adapts it
    assert "pipe1 and pipe2 (16x32 of 512x512 tiles) are 99.97% padding" in line
    assert "511 of 512 workers" in line and "1.00 GiB" in line and "40,960 weights" in line
    assert "--mostly-padding adapt" in line and "16x32 of 10x8 tiles" in line


def test_adapt_replans_only_the_padded_pipes_and_says_so(capsys, wide_pair, tmp_path):
    x, z = wide_pair
    out = tmp_path / "a.safetensors"
    code, stdout, err = run_cli(
        capsys,
        "fit",
        "--x",
        x,
        "--z",
        z,
        "-o",
        out,
        "--pipes",
        3,
        "--ridge",
        "1e-3",
        "--mostly-padding",
        "adapt",
        "--json",
    )
    assert code == 0
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2 and all("re-planned as 16x32 of 10x8 tiles" in n for n in notes)
    cfg = load_adapter(out).config
    # pipes 1 and 2 re-planned; pipe 3 (37.5 % padding) kept as the planner made it
    layer3 = plan_layer3_pipe(256, 160)
    assert [(p.grid, p.tile) for p in cfg.pipes] == [
        ((16, 32), (10, 8)),
        ((16, 32), (10, 8)),
        (layer3.grid, layer3.tile),
    ]
    assert json.loads(stdout)["layout_notes"] == [n.removeprefix("note: ") for n in notes]


def test_keep_fits_the_layout_as_planned():
    cfg = fit_config(256, 160, pipes=3, padding="keep")
    assert [p.tile for p in cfg.pipes[:2]] == [(512, 512), (512, 512)]
    with pytest.raises(PrismInputError, match="--mostly-padding"):
        fit_config(256, 160, pipes=3)


def test_adapt_halves_the_workers_until_at_most_half_is_padding():
    layout = fit_layout(24, 20, padding="adapt")  # 512 workers of 2x1 tiles: 53 % padding
    spec = layout.config.pipes[0]
    assert (spec.grid, spec.tile) == ((8, 16), (3, 2)) and "53.12% padding" in layout.notes[0]
    assert fit_layout(4096, 4096).notes == ()  # the ordinary one-pipe plan has no padding


def test_a_layout_too_big_for_memory_is_refused_before_any_pass(capsys, wide_pair, tmp_path, monkeypatch, no_pass):
    x, z = wide_pair
    monkeypatch.setattr(budget_mod, "available_memory", lambda: 200 << 20)
    out = tmp_path / "a.safetensors"
    code, _, err = run_cli(capsys, "fit", "--x", x, "--z", z, "-o", out, "--pipes", 3, "--mostly-padding", "keep")
    line = one_error_line(err)
    assert code == 2 and "of memory at its peak" in line and "200.00 MiB available" in line and not out.exists()


def test_large_steps_are_cut_into_bounded_chunks():
    cfg = fit_config(256, 160, pipes=3, top_k=8, padding="keep")
    est = budget_mod.estimate_fit(cfg, rows_train=8000, rows_holdout=800, chunk_rows=4096, itemsize=4, gate_batch=256)
    assert est.chunk_rows < 4096 and est.chunk_rows * est.row_bytes <= budget_mod.STEP_BYTES
    small = budget_mod.estimate_fit(
        fit_config(256, 160, workers=32), rows_train=8000, rows_holdout=800, chunk_rows=4096, itemsize=4, gate_batch=256
    )
    assert small.chunk_rows == 4096


# ---- the output folder, checked first -----------------------------------------------------------
def unwritable_outputs(tmp_path):
    """(output, exit code): a path that cannot be a file is bad input (2); a place that refuses
    the write is an output failure (3)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    outs = [(a_file / "out.safetensors", 2), (tmp_path, 2)]  # below a regular file; a folder
    if sys.platform.startswith("linux"):
        outs.append(("/proc/prism-deploy-test.safetensors", 3))  # no one can create files there, root included
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        outs.append((locked / "out.safetensors", 3))
    return outs


def test_unwritable_output_fails_before_any_pass(capsys, pair, tmp_path, no_pass):
    x, z = pair
    for out, want in unwritable_outputs(tmp_path):
        code, _, err = run_cli(capsys, "fit", "--x", x, "--z", z, "-o", out, "--grid", 3, 4)
        line = one_error_line(err)
        assert code == want and str(out) in line and ".probe" not in line and ".tmp" not in line, line


def test_refit_checks_its_output_before_any_pass(capsys, pair, tmp_path, no_pass):
    x, z = pair
    adapter = tmp_path / "a.safetensors"
    random_adapter(fit_config(40, 30, grid=(3, 4)), seed=0).save(adapter)
    for out, want in unwritable_outputs(tmp_path):
        code, _, err = run_cli(capsys, "refit", adapter, "--x", x, "--z", z, "--workers", "1", "-o", out)
        line = one_error_line(err)
        assert code == want and str(out) in line and ".tmp" not in line, line


def test_a_full_disk_is_refused_before_any_pass(capsys, pair, tmp_path, monkeypatch, no_pass):
    import shutil
    from collections import namedtuple

    x, z = pair
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10_000, 9_990, 10))
    out = tmp_path / "a.safetensors"
    code, _, err = run_cli(capsys, "fit", "--x", x, "--z", z, "-o", out, "--grid", 3, 4)
    line = one_error_line(err)
    assert code == 3 and line.startswith(f"error: cannot write {out}: ") and "has 10 B free" in line, line
    assert not out.exists()


def test_missing_output_folders_are_still_created(capsys, pair, tmp_path):
    x, z = pair
    out = tmp_path / "new" / "sub" / "a.safetensors"
    assert run_cli(capsys, "fit", "--x", x, "--z", z, "-o", out, "--grid", 3, 4)[0] == 0
    assert out.is_file()


# ---- progress: every step, and the whole fit with its time left ---------------------------------
class _Recorder:
    bars: list[_Recorder] = []

    def __init__(self, **kw):
        self.kw, self.n = kw, 0.0
        _Recorder.bars.append(self)

    def update(self, n=1):
        self.n += n

    def close(self):
        pass


@pytest.mark.parametrize("kind", ["gated", "ungated", "three gated pipes", "per-tile"])
def test_overall_estimate_is_the_work_the_steps_report(tmp_path, monkeypatch, kind):
    x, z, _ = synthetic_pair(1500, 32, 24, cond=10, seed=6)
    data = PairedData.from_arrays(x, z, tmp_path, holdout=0.2)
    cfg, opts = {
        "gated": (fit_config(32, 24, grid=(3, 4), top_k=4), FitOptions(rounds=2, gate_steps=20, gate_batch=128)),
        "ungated": (fit_config(32, 24, grid=(3, 4)), FitOptions()),
        "three gated pipes": (
            fit_config(32, 24, grid=(2, 3), pipes=3, top_k=2),
            FitOptions(rounds=1, gate_steps=10, sweeps=2),
        ),
        "per-tile": (fit_config(32, 24, grid=(3, 4)), FitOptions(method="per-tile")),
    }[kind]
    _Recorder.bars.clear()
    monkeypatch.setattr(progress, "_tqdm", lambda **kw: _Recorder(**kw))
    _, report = fit_adapter(cfg, data, opts)
    assert all(r.get("kept", True) for r in report.rounds)  # every round ran: the estimate is exact
    overall = [b for b in _Recorder.bars if b.kw["desc"] == "fit"]
    assert len(overall) == 1 and overall[0].kw["total"] == pytest.approx(fit_work(cfg, data, opts), rel=1e-12)
    assert overall[0].n == pytest.approx(overall[0].kw["total"], rel=1e-9)
    # every step bar has a known total (so tqdm can show its time left)
    assert all(b.kw["total"] for b in _Recorder.bars)


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_the_time_left_on_a_terminal_and_nothing_otherwise(tmp_path, monkeypatch):
    x, z, _ = synthetic_pair(800, 16, 12, seed=2)
    data = PairedData.from_arrays(x, z, tmp_path)
    cfg = fit_config(16, 12, grid=(2, 2), top_k=2)
    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setenv("COLUMNS", "120")
    fit_adapter(cfg, data, FitOptions(rounds=1, gate_steps=30))
    text = tty.getvalue()
    assert "fit:" in text and "left" in text and "round 1: gates" in text and "re-solve pipe 0" in text
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    fit_adapter(cfg, data, FitOptions(rounds=1, gate_steps=30))
    assert pipe.getvalue() == ""


@pytest.mark.parametrize("command", ["refit", "workers"])
def test_refit_and_workers_estimate_their_whole_work_too(capsys, pair, tmp_path, monkeypatch, command):
    x, z = pair
    adapter = tmp_path / "a.safetensors"
    random_adapter(fit_config(40, 30, grid=(3, 4), top_k=3), seed=0).save(adapter)
    _Recorder.bars.clear()
    monkeypatch.setattr(progress, "_tqdm", lambda **kw: _Recorder(**kw))
    extra = ["--workers", "1,5-6", "-o", tmp_path / "b.safetensors"] if command == "refit" else []
    assert run_cli(capsys, command, adapter, "--x", x, "--z", z, *extra)[0] == 0
    overall = [b for b in _Recorder.bars if b.kw["desc"] == command]
    assert len(overall) == 1 and overall[0].n == pytest.approx(overall[0].kw["total"], rel=1e-9)


def test_check_number_edges():
    from prism_deploy.fit.option_ranges import check_number

    assert check_number("seed", 3.0) == 3 and check_number("ridge", 1) == 1.0
    for name, value in (
        ("seed", 10**400),
        ("ridge", 10**400),
        ("seed", True),
        ("seed", "3"),
        ("seed", 2.5),
        ("gate_lr", 0.0),
        ("holdout", float("nan")),
    ):
        with pytest.raises(PrismInputError):
            check_number(name, value)
