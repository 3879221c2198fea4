"""Where commands write: nothing lost, nothing half-written, every error one line naming the
user's path (issue 17, sections 1, 4 and 7).

The class is tested on every command that writes, through the one mechanism they share
(``prism_deploy.cli.paths`` before any work, ``prism_deploy.core.fsutil`` at the write):
an output that is an input, a device, a FIFO, a folder, a path below a file, an unwritable
folder, a full disk, a name at the file-system limit, and the mode of what is written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from prism_deploy.cli.main import main
from prism_deploy.core.fsutil import atomic_output, write_bytes_atomic
from prism_deploy.core.onnx_io import save_model
from prism_deploy.format import write_adapter_file
from prism_deploy.reference import random_adapter, simple_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "demo-adapter.safetensors"


def run_cli(argv: list[str]) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture()
def inputs(tmp_path):
    """One input of each kind the writing commands read."""
    adapter = tmp_path / "a.safetensors"
    shutil.copyfile(EXAMPLE, adapter)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "X.npy", rng.standard_normal((400, 256)).astype(np.float32))
    np.save(tmp_path / "Z.npy", rng.standard_normal((400, 160)).astype(np.float32))
    (tmp_path / "texts.txt").write_text("one\ntwo\n")
    assert run_cli(["export", adapter, "-o", tmp_path / "a.onnx", "--plugin"]) == 0
    return tmp_path


# command -> argv with OUT where the output goes; each reads the files of ``inputs``
WRITERS = {
    "export": ["export", "{d}/a.safetensors", "-o", "OUT", "--precision", "fp32"],
    "fuse": ["fuse", "{d}/a.onnx", "-o", "OUT"],
    "fit": ["fit", "--x", "{d}/X.npy", "--z", "{d}/Z.npy", "--grid", "2", "2", "-o", "OUT"],
    "refit": ["refit", "{d}/a.safetensors", "--x", "{d}/X.npy", "--z", "{d}/Z.npy", "--workers", "0", "-o", "OUT"],
    "collect": ["collect", "--model-a", "{d}", "--model-b", "{d}", "--text", "{d}/texts.txt", "-o", "OUT"],
    "bench --json-out": ["bench", "{d}/a.safetensors", "--backends", "ort-cpu", "--json-out", "OUT"],
}
FOLDER_WRITERS = {
    "build": ["build", "{d}/a.safetensors", "--target", "ort-cpu", "-o", "OUT"],
    "export-model": ["export-model", "{d}", "--role", "first", "-o", "OUT"],
    "triton": ["triton", "{d}", "-o", "OUT"],
}


def argv_for(template: list[str], d: Path, out: Path | str) -> list[str]:
    return [str(out) if a == "OUT" else a.format(d=d) for a in template]


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


@pytest.mark.parametrize("command", list(WRITERS))
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(command, inputs, capsys):
    for victim in ("a.safetensors", "X.npy", "texts.txt", "a.onnx"):
        if not any(victim in a for a in WRITERS[command]):
            continue
        before = snapshot(inputs)
        assert run_cli(argv_for(WRITERS[command], inputs, inputs / victim)) == 2
        one_error_line(capsys, victim, "is also an input")
        assert snapshot(inputs) == before
        # the same file under another name: a symlink, or ./ in front
        link = inputs / "link"
        link.symlink_to(inputs / victim)
        assert run_cli(argv_for(WRITERS[command], inputs, link)) == 2
        one_error_line(capsys, "is also an input")
        link.unlink()
        assert snapshot(inputs) == before


@pytest.mark.parametrize("command", [*WRITERS, *FOLDER_WRITERS])
def test_devices_fifos_and_paths_below_a_file_are_refused_before_any_work(command, inputs, capsys):
    template = {**WRITERS, **FOLDER_WRITERS}[command]
    fifo = inputs / "fifo"
    os.mkfifo(fifo)
    for out, needle in (
        (Path("/dev/null"), "is a device"),
        (fifo, "is a FIFO"),
        (inputs / "a.safetensors" / "x", "is a file, not a folder"),
    ):
        if command in FOLDER_WRITERS and out == Path("/dev/null"):
            needle = "is not a folder"
        if command in FOLDER_WRITERS and out == fifo:
            needle = "is not a folder"
        before = snapshot(inputs)
        assert run_cli(argv_for(template, inputs, out)) == 2, out
        one_error_line(capsys, str(out), needle)
        assert snapshot(inputs) == before
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_folder_where_a_file_is_written_is_refused(command, inputs, capsys):
    (inputs / "folder").mkdir()
    assert run_cli(argv_for(WRITERS[command], inputs, inputs / "folder")) == 2
    one_error_line(capsys, "folder", "is a folder")


@pytest.mark.parametrize("command", ["export", "fit", "refit", "bench --json-out"])
def test_a_file_output_in_a_missing_folder_is_written_there(command, inputs, capsys):
    """One rule for every file output (``core.fsutil.output_path``, as fit's preflight tests too):
    its missing folders are made at the write; before any work only the nearest existing folder
    is probed (an unwritable one is refused, tests below)."""
    out = inputs / "no" / "such" / "out.bin"
    assert run_cli(argv_for(WRITERS[command], inputs, out)) == 0, capsys.readouterr().err
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["out.bin"]  # no temp file left


def test_two_outputs_on_one_path_are_refused(inputs, capsys):
    out = inputs / "r.json"
    assert run_cli(["bench", inputs / "a.safetensors", "--json-out", out, "--plot", out]) == 2
    one_error_line(capsys, "named as two outputs")


def test_export_model_refuses_a_folder_of_its_input(inputs, capsys):
    hf = inputs / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert run_cli(["export-model", hf, "--role", "first", "-o", hf]) == 2
    one_error_line(capsys, "is also an input")
    assert (hf / "config.json").read_text() == "{}"


def test_export_model_refuses_a_folder_of_foreign_files(tmp_path):
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.format.model_folder import check_export_folder

    out = tmp_path / "out"
    out.mkdir()
    check_export_folder(out)  # empty: fine
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PrismInputError, match="did not write \\(notes.txt\\)"):
        check_export_folder(out)
    check_export_folder(out, force=True)
    (out / "model.json").write_text("{not json")  # not an export's manifest: foreign too
    with pytest.raises(PrismInputError, match="model.json, notes.txt"):
        check_export_folder(out)


# ---- the write itself ----------------------------------------------------------------------------


def _read_only_folder(tmp_path: Path) -> contextlib.AbstractContextManager[Path | None]:
    """A folder the user cannot write: a read-only tmpfs as root, chmod 0555 otherwise."""

    @contextlib.contextmanager
    def folder():
        ro = tmp_path / "ro"
        ro.mkdir()
        if os.geteuid() != 0:
            ro.chmod(0o555)
            try:
                yield ro
            finally:
                ro.chmod(0o755)
            return
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True
            ).returncode
            == 0
        )
        try:
            yield ro if mounted else None
        finally:
            if mounted:
                subprocess.run(["umount", str(ro)], check=False)

    return folder()


@pytest.mark.parametrize("command", [*WRITERS, *FOLDER_WRITERS])
def test_an_unwritable_place_is_refused_before_any_work(command, inputs, tmp_path, capsys):
    template = {**WRITERS, **FOLDER_WRITERS}[command]
    with _read_only_folder(tmp_path) as ro:
        if ro is None:
            pytest.skip("cannot make a read-only folder here (root without mount)")
        for out in (ro / "out", ro / "no" / "such" / "out"):  # a missing folder is probed where it would be made
            assert run_cli(argv_for(template, inputs, out)) == 3  # the place refused: not bad input
            one_error_line(capsys, f"cannot write {out}: ")
        assert not (ro / "no").exists()


def _limited(code: str, limit: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with files capped at ``limit`` bytes: a write past it fails as a full disk does."""
    prelude = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        sys.dont_write_bytecode = True
    """)
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.parametrize("command", ["export", "fit", "build"])
def test_a_full_disk_is_one_line_naming_the_users_path_and_leaves_nothing(command, inputs):
    out = inputs / "out"
    template = {**WRITERS, **FOLDER_WRITERS}[command]
    argv = argv_for(template, inputs, out)
    before = sorted(p.name for p in inputs.iterdir())
    proc = _limited(f"from prism_deploy.cli.main import main\nsys.exit(main({argv!r}))", 4096, inputs)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {out}: ") and "too large" in lines[0], (
        proc.stderr
    )
    assert ".tmp" not in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in inputs.iterdir()) == before  # no temp file, no empty folder


def test_names_at_the_file_system_limit(tmp_path):
    longest = tmp_path / ("n" * 250 + ".onnx")  # 255 bytes: its temporary name must fit too
    write_bytes_atomic(longest, b"x")
    assert longest.read_bytes() == b"x" and [p.name for p in tmp_path.iterdir()] == [longest.name]
    from prism_deploy.core.errors import PrismInputError, WriteError

    with pytest.raises(WriteError, match=r"cannot write .*n+\.onnxx: File name too long") as caught:
        write_bytes_atomic(tmp_path / ("n" * 250 + ".onnxx"), b"x")
    assert not isinstance(caught.value, PrismInputError)  # the file system's refusal, not bad input


def test_a_write_the_disk_refuses_is_exit_3_naming_the_users_path(inputs, capsys, monkeypatch):
    """ENOSPC met while writing a temporary file: one line naming the output the user gave, exit 3
    (not 2: the input was fine), no traceback, no temporary file left."""
    import errno

    from prism_deploy.core import fsutil

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))

    monkeypatch.setattr(fsutil.os, "replace", full)
    out = inputs / "out.onnx"
    before = sorted(p.name for p in inputs.iterdir())
    assert run_cli(argv_for(WRITERS["export"], inputs, out)) == 3
    line = one_error_line(capsys, f"cannot write {out}: No space left on device")
    assert ".tmp" not in line and "Traceback" not in line
    assert sorted(p.name for p in inputs.iterdir()) == before


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_get_the_mode_the_umask_says(umask, tmp_path):
    adapter = random_adapter(simple_config(8, 8, (2, 2)), seed=0)
    old = os.umask(umask)
    try:
        write_adapter_file(tmp_path / "a.safetensors", adapter.config, adapter.tensors())  # safetensors' writer
        write_bytes_atomic(tmp_path / "b.bin", b"x")
        from prism_deploy.lower import export_onnx

        export_onnx(adapter, tmp_path / "c.onnx")
    finally:
        os.umask(old)
    for name in ("a.safetensors", "b.bin", "c.onnx"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


def test_an_executable_written_atomically_stays_executable(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "tool") as tmp:
            tmp.write_bytes(b"#!/bin/sh\n")
            tmp.chmod(0o700)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "tool").st_mode) == 0o755


def test_onnx_save_names_the_users_path(tmp_path):
    import onnx

    from prism_deploy.core.errors import PrismInputError

    (tmp_path / "file").write_text("x")
    with pytest.raises(PrismInputError, match="is a file, not a folder"):
        save_model(onnx.ModelProto(), tmp_path / "file" / "m.onnx")


def test_a_closed_pipe_ends_quietly(tmp_path):
    """``inspect | head -1``: the reader goes away; no traceback, the exit of a tool killed by SIGPIPE."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "prism_deploy", "inspect", str(EXAMPLE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command prints
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_an_output_inside_an_input_folder_replaces_nothing_there(inputs, capsys):
    """``collect -o HF_DIR/model.safetensors`` replaced the model's own weights (issue 17)."""
    hf = inputs / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"weights")
    assert (
        run_cli(
            [
                "collect",
                "--model-a",
                hf,
                "--model-b",
                hf,
                "--text",
                inputs / "texts.txt",
                "-o",
                hf / "model.safetensors",
            ]
        )
        == 2
    )
    one_error_line(capsys, "is inside", "would replace a file the command reads")
    assert (hf / "model.safetensors").read_bytes() == b"weights"
    # a new file inside a folder prism-deploy owns (a build folder given as input) is refused too
    eng = inputs / "eng"
    assert run_cli(["build", inputs / "a.safetensors", "-o", eng, "--target", "ort-cpu", "--precision", "fp32"]) == 0
    capsys.readouterr()
    assert run_cli(["triton", eng, "-o", eng / "repo"]) == 2
    one_error_line(capsys, "a folder prism-deploy wrote")
    assert not (eng / "repo").exists()


@pytest.mark.parametrize("errno_name, code", [("ENOSPC", 3), ("EROFS", 3), ("ENOENT", 2)])
def test_an_os_error_from_inside_a_library_is_said_of_the_users_output(errno_name, code, tmp_path, capsys, monkeypatch):
    """An OSError that escapes every write helper (a library writing its own temporary file): a full
    or read-only file system is exit 3 naming the output given; any other OSError stays exit 2."""
    import errno

    from prism_deploy.cli import export_cmd

    number = getattr(errno, errno_name)
    hidden = tmp_path / ".inside-a-library.tmp"

    def refused(args):
        raise OSError(number, os.strerror(number), str(hidden))

    monkeypatch.setattr(export_cmd, "run", refused)
    out = tmp_path / "out.onnx"
    assert run_cli(["export", EXAMPLE, "-o", out]) == code
    line = one_error_line(capsys, os.strerror(number))
    assert line.startswith(f"error: cannot write {out}: ") if code == 3 else str(hidden) in line
