"""``prism-deploy fit``, ``workers`` and ``refit`` end to end, through the CLI entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from prism_deploy.cli.main import main
from prism_deploy.fit import PairedData
from prism_deploy.fit.evaluate import evaluate
from prism_deploy.reference import load_adapter, save_adapter
from tests.fit_data import synthetic_pair


@pytest.fixture
def pair(tmp_path):
    x, z, _ = synthetic_pair(1500, 40, 30, cond=20, seed=11)
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    np.save(tmp_path / "z.npy", z.astype(np.float32))
    return tmp_path / "x.npy", tmp_path / "z.npy"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def holdout_error(adapter_path, x, z) -> float:
    return evaluate(load_adapter(adapter_path), PairedData(x, z), "holdout").rel_err  # type: ignore[return-value]


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_fit_writes_a_valid_adapter_and_reports(capsys, pair, tmp_path):
    x, z = pair
    out = tmp_path / "a.safetensors"
    code, stdout, _ = run_cli(
        capsys, "fit", "--x", x, "--z", z, "-o", out, "--grid", 3, 4, "--dtype", "float16", "--json"
    )
    assert code == 0
    info = json.loads(stdout)
    adapter = load_adapter(out)
    assert adapter.pipe_list()[0].tiles.dtype == torch.float16
    assert adapter.config.pipes[0].grid == (3, 4)
    assert info["holdout"]["rel_err"] == pytest.approx(holdout_error(out, x, z), rel=1e-9)
    assert info["holdout"]["rel_err"] < 0.05 and info["holdout"]["cosine"] > 0.99
    code, stdout, _ = run_cli(capsys, "fit", "--x", x, "--z", z, "-o", out, "--grid", 3, 4)
    assert code == 0 and "holdout" in stdout and "worst row-block" in stdout


@pytest.mark.parametrize("top_k", [None, 5], ids=["ungated", "gated"])
def test_corrupted_worker_is_found_and_repaired(capsys, pair, tmp_path, top_k):
    x, z = pair
    good = tmp_path / "good.safetensors"
    argv = ["fit", "--x", x, "--z", z, "-o", good, "--grid", 3, 4, "--rounds", 1, "--gate-steps", 60]
    assert run_cli(capsys, *argv, *(["--top-k", top_k] if top_k else []))[0] == 0
    original = holdout_error(good, x, z)

    bad_worker = 6
    adapter = load_adapter(good)
    with torch.no_grad():
        tiles = adapter.pipe_list()[0].tiles
        tiles[bad_worker] += (
            3 * tiles[bad_worker].std() * torch.randn(tiles.shape[1:], generator=torch.Generator().manual_seed(0))
        )
    bad = tmp_path / "bad.safetensors"
    save_adapter(adapter, bad)
    assert holdout_error(bad, x, z) > 1.3 * original

    code, stdout, _ = run_cli(capsys, "workers", bad, "--x", x, "--z", z, "--json", "--top", 3)
    assert code == 0
    ranking = json.loads(stdout)["workers"]
    # the corrupted worker first, by far: healthy tiles are their own joint share (up to float32)
    assert ranking[0]["worker"] == bad_worker and ranking[0]["deviation"] > 100 * ranking[1]["deviation"]
    # re-solving it alone removes most of the error; a neighbour on its rows could remove less
    assert ranking[0]["excess"] > 0.3 and ranking[0]["excess"] >= max(r["excess"] for r in ranking)

    fixed = tmp_path / "fixed.safetensors"
    code, _, _ = run_cli(capsys, "refit", bad, "--x", x, "--z", z, "--workers", f"{bad_worker}", "-o", fixed)
    assert code == 0
    assert holdout_error(fixed, x, z) == pytest.approx(original, rel=1e-3)

    before, after = load_file(str(bad)), load_file(str(fixed))
    assert before.keys() == after.keys()
    for name in before:
        if name == "pipes.0.tiles":
            for w in range(before[name].shape[0]):
                same = raw_bytes(before[name][w]) == raw_bytes(after[name][w])
                assert same == (w != bad_worker), f"worker {w}"
        else:
            assert raw_bytes(before[name]) == raw_bytes(after[name]), name


def test_refit_of_a_worker_range(capsys, pair, tmp_path):
    x, z = pair
    good = tmp_path / "good.safetensors"
    assert run_cli(capsys, "fit", "--x", x, "--z", z, "-o", good, "--grid", 3, 4)[0] == 0
    adapter = load_adapter(good)
    with torch.no_grad():
        adapter.pipe_list()[0].tiles[[1, 4, 5, 9]] = 0
    bad = tmp_path / "bad.safetensors"
    save_adapter(adapter, bad)
    code, stdout, _ = run_cli(capsys, "refit", bad, "--x", x, "--z", z, "--workers", "1,4-5,9", "--json")
    assert code == 0
    info = json.loads(stdout)
    assert info["workers"] == [1, 4, 5, 9]
    assert info["rel_err_after"] == pytest.approx(holdout_error(good, x, z), rel=1e-3)
    assert holdout_error(info["output"], x, z) == pytest.approx(info["rel_err_after"], rel=1e-9)


def bad_inputs(tmp_path, x, z):
    """(name, extra argv) pairs for input the fit must refuse."""
    short = tmp_path / "short.npy"
    np.save(short, np.load(z)[:-3])
    nan = tmp_path / "nan.npy"
    xs = np.load(x)
    xs[700, 3] = np.nan
    np.save(nan, xs)
    dup = tmp_path / "dup.npy"
    xd = np.load(x)
    xd[:, 5] = xd[:, 2]
    np.save(dup, xd)
    csv = tmp_path / "x.csv"
    csv.write_text("1,2\n3,4\n")
    return [
        ("mismatched rows", ["--x", x, "--z", short], "has 1500 rows but --z"),
        ("NaN in X", ["--x", nan, "--z", z], "NaN or Inf"),
        ("rank deficient", ["--x", dup, "--z", z], "rank-deficient"),
        ("unknown file type", ["--x", csv, "--z", z], "unknown file type"),
        ("too few rows", ["--x", x, "--z", z, "--holdout", "0.99"], "rank-deficient"),
        ("top-k too large", ["--x", x, "--z", z, "--top-k", "13"], "--top-k"),
    ]


def test_bad_input_is_one_error_line_and_no_file(capsys, pair, tmp_path):
    x, z = pair
    out = tmp_path / "never.safetensors"
    for name, argv, needle in bad_inputs(tmp_path, x, z):
        code, stdout, err = run_cli(capsys, "fit", *argv, "-o", out, "--grid", 3, 4)
        assert code == 2, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, err)
        assert not out.exists(), name
        assert not list(tmp_path.glob(".never.safetensors.*")), name  # no temporary left behind


def test_refit_and_workers_refuse_bad_input(capsys, pair, tmp_path):
    x, z = pair
    good = tmp_path / "good.safetensors"
    assert run_cli(capsys, "fit", "--x", x, "--z", z, "-o", good, "--grid", 3, 4)[0] == 0
    out = tmp_path / "new.safetensors"
    for spec in ("12", "3-1", "a"):
        code, _, err = run_cli(capsys, "refit", good, "--x", x, "--z", z, "--workers", spec, "-o", out)
        assert code == 2 and err.startswith("error: --workers") and not out.exists()
    other = tmp_path / "z2.npy"
    np.save(other, np.zeros((1500, 29), np.float32))
    code, _, err = run_cli(capsys, "workers", good, "--x", x, "--z", other)
    assert code == 2 and "adapter maps 40 -> 30" in err


def test_safetensors_and_npz_inputs_fit_like_npy(capsys, pair, tmp_path):
    from safetensors.numpy import save_file

    x, z = pair
    xs, zs = tmp_path / "x.safetensors", tmp_path / "z.npz"
    save_file({"hidden": np.load(x)}, str(xs))
    np.savez(zs, target=np.load(z))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run_cli(capsys, "fit", "--x", x, "--z", z, "-o", a, "--grid", 2, 2, "--chunk-rows", 500)[0] == 0
    assert run_cli(capsys, "fit", "--x", xs, "--z", zs, "-o", b, "--grid", 2, 2, "--chunk-rows", 333)[0] == 0
    ta, tb = load_file(str(a)), load_file(str(b))
    torch.testing.assert_close(ta["pipes.0.tiles"], tb["pipes.0.tiles"], rtol=1e-5, atol=1e-6)
