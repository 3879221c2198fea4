"""What the runtime API and the run command accept (issue 17, sections 2 and 4): any array-like
of the right shape runs; anything else is one PrismInputError (exit 2 on the command line),
never a raw AttributeError, RuntimeError or ValueError. The lowered-ONNX cache is keyed by
content and verified; a seed .pt holding an expanded tensor is refused before any copy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prism_deploy.cli.main import main
from prism_deploy.core.errors import PrismInputError
from prism_deploy.reference import random_adapter, simple_config
from prism_deploy.runtime import load_engines

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    adapter = random_adapter(simple_config(16, 12, (2, 2), top_k=2), seed=4)
    adapter.save(root / "a.safetensors")
    assert (
        main(
            [
                "build",
                str(root / "a.safetensors"),
                "-o",
                str(root / "e"),
                "--target",
                "ort-cpu",
                "--precision",
                "fp32",
                "--batch",
                "1:2:4",
                "--seq",
                "1:4:8",
            ]
        )
        == 0
    )
    return load_engines(root / "e"), adapter


def test_array_likes_run_and_agree(engines):
    runner, adapter = engines
    x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
    want = runner.run(x)
    with torch.no_grad():
        ref = adapter(torch.from_numpy(x)).numpy()
    assert np.allclose(want, ref, atol=1e-5)
    assert np.array_equal(runner.run(x.tolist()), want)  # nested lists
    assert np.array_equal(runner.run(torch.from_numpy(x).requires_grad_(True)), want)  # a tensor with grad
    assert np.allclose(runner.run(x.astype(np.float64)), want, atol=1e-6)
    assert runner.run(x[0]).shape == (3, 12)  # [tokens, in_dim]


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros((1, 2, 15), np.float32), "must be"),
        (np.zeros((1, 1, 2, 16), np.float32), "must be"),
        (np.array([[object()] * 16]), "not a number type"),
        ("sixteen floats", "not a number type"),
        ([[1.0] * 16, [1.0] * 15], "hidden"),
        (None, "hidden"),
    ],
)
def test_anything_else_is_one_clean_error(engines, bad, words):
    runner, _ = engines
    with pytest.raises(PrismInputError, match=words) as info:
        runner.run(bad)
    assert "\n" not in str(info.value)


def test_the_lowered_cache_is_verified_by_content(tmp_path):
    from prism_deploy.runtime.adapters import adapter_runner

    path = tmp_path / "a.safetensors"
    adapter = random_adapter(simple_config(16, 12, (2, 2), top_k=2), seed=5)
    adapter.save(path)
    x = np.random.default_rng(1).standard_normal((1, 4, 16)).astype(np.float32)
    first = adapter_runner(path, "ort-cpu")
    want = first.run(x)
    cached = first.path
    # replaced by another adapter's graph of the same layout: found out, lowered again
    other = tmp_path / "b.safetensors"
    random_adapter(simple_config(16, 12, (2, 2), top_k=2), seed=6).save(other)
    swapped = adapter_runner(other, "ort-cpu").path
    cached.write_bytes(swapped.read_bytes())
    assert np.array_equal(adapter_runner(path, "ort-cpu").run(x), want)
    cached.write_bytes(b"garbage")  # not a graph at all: lowered again, no traceback
    assert np.array_equal(adapter_runner(path, "ort-cpu").run(x), want)


def test_an_expanded_tensor_is_refused_before_it_is_copied(tmp_path, capsys):
    src = tmp_path / "tiles.pt"
    torch.save(torch.zeros(1).expand(4096, 4096, 4096), src)  # 256 GiB dense, 4 bytes stored
    assert src.stat().st_size < 10_000
    assert (
        main(["convert", str(src), "--in-dim", "4096", "--out-dim", "4096", "-o", str(tmp_path / "a.safetensors")]) == 2
    )
    assert "expanded tensor" in capsys.readouterr().err and not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("ids", ["object", "deep", "ragged", "floats", "empty"])
def test_run_ids_files_are_checked(ids, zoo, tmp_path):
    if ids == "object":
        path = tmp_path / "ids.npy"
        np.save(path, np.array([[object()]], dtype=object), allow_pickle=True)
    else:
        path = tmp_path / "ids.json"
        path.write_text(
            {"deep": "[" * 100_000 + "]" * 100_000, "ragged": "[[1, 2], [3]]", "floats": "[[1.5, 2]]", "empty": "[]"}[
                ids
            ]
        )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "prism_deploy",
            "run",
            "--model-a",
            str(zoo["A"]),
            "--adapter",
            str(zoo["adapter"]),
            "--model-b",
            str(zoo["B"]),
            "--ids",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 2 and out.stdout == "", out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}") and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "ids, words",
    [
        ([[]], "batch >= 1 and seq >= 1"),
        (np.zeros((0, 4), np.int64), "batch >= 1"),
        ([[1, 2], [3]], "same length"),
        ([[1.5, 2.0]], "integer"),
    ],
)
def test_the_chain_refuses_bad_ids_in_one_line(zoo, ids, words):
    from prism_deploy.runtime.chain import Pipeline

    pipe = Pipeline(zoo["A"], zoo["adapter"], zoo["B"])
    with pytest.raises(PrismInputError, match=words):
        pipe(ids)
    assert json.dumps(pipe.describe())  # still usable, and describable
