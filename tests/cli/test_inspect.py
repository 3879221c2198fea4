"""``prism-deploy inspect``: the table and the JSON say what ``describe()`` says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prism_deploy import AdapterConfig, PipeSpec, load_adapter
from prism_deploy.cli.main import main
from prism_deploy.cli.output import human_bytes
from prism_deploy.reference import random_adapter

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "demo-adapter.safetensors"


@pytest.fixture
def padded_fp16(tmp_path) -> Path:
    # 3 row-blocks of 4 over out_dim 7: row-block 2 starts at 8 > 7, so 2 workers are pure padding
    cfg = AdapterConfig(
        9,
        7,
        (PipeSpec("wide", (3, 2), (4, 5), None), PipeSpec("gated", (1, 3), (7, 3), 2, 0.25)),
        "sum",
        source_model={"model": "a", "layer": -1},
        target_model=None,
    )
    path = tmp_path / "padded.safetensors"
    random_adapter(cfg, seed=5, dtype=torch.float16).save(path)
    return path


@pytest.mark.parametrize("which", ["example", "padded"])
def test_json_is_describe(which, padded_fp16, capsys):
    path = EXAMPLE if which == "example" else padded_fp16
    assert main(["inspect", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == json.loads(json.dumps(load_adapter(path).describe()))


@pytest.mark.parametrize("which", ["example", "padded"])
def test_table_shows_what_describe_says(which, padded_fp16, capsys):
    path = EXAMPLE if which == "example" else padded_fp16
    info = load_adapter(path).describe()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{info['in_dim']} -> {info['out_dim']}" in out and f"combine={info['combine']}" in out
    lines = out.splitlines()
    for pipe in info["pipes"]:
        row = next(line.split() for line in lines if line.split()[:2] == [str(pipe["index"]), pipe["name"]])
        grid, tile = "x".join(map(str, pipe["grid"])), "x".join(map(str, pipe["tile"]))
        assert row[2:5] == [grid, tile, str(pipe["workers"])]
        assert row[5] == (str(pipe["top_k"]) if pipe["top_k"] is not None else "all")
        assert pipe["dtype"] in row and row[-1] == str(pipe["padding_workers"])
        assert " ".join(row[-3:-1]) == human_bytes(pipe["bytes"])
    assert f"{info['flops_per_token']['dense']:,} FLOPs dense" in out
    assert f"{info['flops_per_token']['gated']:,} gated" in out
    assert f"params: {info['params']:,}" in out
    for key in ("source", "target"):
        assert (f"{key}: " in out) == (info[key] is not None)


def test_padding_workers_are_reported(padded_fp16, capsys):
    assert main(["inspect", str(padded_fp16)]) == 0
    out = capsys.readouterr().out
    assert "note: 2 worker(s) lie wholly in the padding" in out
    assert "float16" in out and '"layer": -1' in out


def test_inspect_example_via_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "prism_deploy", "inspect", str(EXAMPLE)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stderr == ""
    assert "256 -> 160, 3 pipe(s), combine=weighted" in proc.stdout


def test_a_folder_that_is_neither_build_nor_model_is_named(tmp_path, capsys):
    """A model folder is named as such (tests/cli/test_wording.py); any other folder as not a build."""
    assert main(["inspect", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path}: a folder without manifest.json (not a `prism-deploy build` folder)\n"
    )
