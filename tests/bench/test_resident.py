"""Resident memory per case in ``bench --model --memory`` (prism_deploy/bench/resident.py): a fresh
child process per case reads VmRSS and VmHWM after its imports, its load and one generation,
beside a baseline child that loads nothing; figures in the JSON and a column of the table."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from prism_deploy.bench import resident
from prism_deploy.cli.main import main

linux_only = pytest.mark.skipif(not resident.STATUS.is_file(), reason="VmRSS / VmHWM are read from Linux's /proc")


@linux_only
def test_status_is_read_in_bytes():
    figures = resident.read_status()
    assert set(figures) == {"rss_bytes", "hwm_bytes"}
    assert figures["hwm_bytes"] >= figures["rss_bytes"] > 1 << 20  # a Python process holds megabytes
    assert figures["rss_bytes"] % 1024 == 0  # the kernel counts in KiB


@linux_only
def test_memory_figures_per_case_and_net_of_the_baseline(zoo, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(zoo["B"]), "--no-eager", "--no-peers", "--memory"]
    args += ["--prompt", "4", "--new-tokens", "2", "--repeat", "1", "--warmup", "0", "--json-out", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "peak RSS (net)" in table and "less a bare Python process's" in table
    results = json.loads(out.read_text())
    assert "VmHWM" in results["memory"]["method"]
    base = results["memory"]["baseline"]
    (case,) = results["cases"]
    mem = case["memory"]
    for point in ("after_imports", "after_load", "after_run"):
        assert set(mem[point]) == set(base[point]) == {"rss_bytes", "hwm_bytes"}
        assert mem[point]["hwm_bytes"] >= mem[point]["rss_bytes"] > 0
    # the peak only grows; loading a model and ONNX Runtime takes more than the bare interpreter
    assert mem["after_run"]["hwm_bytes"] >= mem["after_load"]["hwm_bytes"] >= mem["after_load"]["rss_bytes"]
    assert mem["after_load"]["rss_bytes"] > mem["after_imports"]["rss_bytes"] > base["after_run"]["rss_bytes"]
    assert mem["net_peak_bytes"] == mem["after_run"]["hwm_bytes"] - base["after_run"]["hwm_bytes"] > 0
    # the baseline loads nothing: its figures barely move between the three points
    assert base["after_run"]["hwm_bytes"] - base["after_imports"]["rss_bytes"] < 8 << 20


def test_no_proc_means_not_measured(monkeypatch, tmp_path):
    monkeypatch.setattr(resident, "STATUS", tmp_path / "no-proc" / "status")
    baseline, cases = resident.measure([{"name": "b", "kind": "folder"}], tmp_path)
    assert (
        baseline == cases["b"] == {"not_measured": f"not measured: no {tmp_path / 'no-proc' / 'status'} (Linux only)"}
    )
    from prism_deploy.cli.bench_model_cmd import _resident

    assert _resident(cases["b"]) == "not measured"


@linux_only
def test_a_child_that_fails_gives_its_last_line(tmp_path):
    np.savez(tmp_path / "inputs.npz", first=np.zeros((1, 2, 4), np.float32), steps=np.zeros((0,)))
    spec = {"name": "gone", "kind": "folder", "path": str(tmp_path / "gone"), "inputs": str(tmp_path / "inputs.npz")}
    baseline, cases = resident.measure([spec], tmp_path)
    assert "after_run" in baseline
    assert cases["gone"]["error"].startswith("the child process failed (exit 1): ")
    assert "gone" in cases["gone"]["error"] and "net_peak_bytes" not in cases["gone"]


def test_the_child_module_imports_no_torch():
    """The package's names load lazily: a child measuring an ONNX folder must not hold PyTorch."""
    import subprocess

    code = "import sys, prism_deploy.bench.resident, prism_deploy.bench.models; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_folder_case_reads_its_graphs_weights_only_when_asked(zoo, monkeypatch):
    """Loading a case (what ``--memory``'s child measures) opens its session and nothing else:
    parsing a graph whose weights are inline would hold them twice more in the measured process."""
    from prism_deploy.bench import model_runners

    read = []
    real = model_runners.graph_bytes
    monkeypatch.setattr(model_runners, "graph_bytes", lambda path: read.append(path) or real(path))
    case = model_runners.OrtModel(zoo["B"], threads=1)
    assert read == []
    assert case.bytes["per_token"] > 0 and read == [case.graph_path]
    assert case.describe()["weight_bytes_per_token"] == case.bytes["per_token"] and len(read) == 1
