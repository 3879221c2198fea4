"""``prism-deploy convert``: the seed's torch.save'd tiles -> a v1 adapter, safely."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from prism_deploy import load_adapter
from prism_deploy.cli.main import main
from prism_deploy.core.errors import PrismInputError
from prism_deploy.format.convert import infer_grid, load_seed_tiles, tiles_to_adapter


def run_cli(argv):
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def seed_formula(tiles: torch.Tensor, grid, in_dim: int, out_dim: int, x: torch.Tensor) -> torch.Tensor:
    """The seed's inference loop, with its accumulation fixed (+=): per worker, in float64."""
    R, C = grid
    _, tr, tc = tiles.shape
    xp = torch.zeros(x.shape[0], C * tc, dtype=torch.float64)
    xp[:, :in_dim] = x.double()
    out = torch.zeros(x.shape[0], R * tr, dtype=torch.float64)
    for w in range(R * C):
        r, c = w // C, w % C
        out[:, r * tr : (r + 1) * tr] += xp[:, c * tc : (c + 1) * tc] @ tiles[w].double().T
    return out[:, :out_dim]


@pytest.mark.parametrize(
    "in_dim,out_dim,grid,tile",
    [
        (12, 8, (2, 3), (4, 4)),  # exact fit
        (13, 10, (3, 2), (4, 7)),  # padding on both sides
        (30, 5, (1, 6), (5, 5)),
    ],
)
def test_round_trip_matches_the_tile_formula(in_dim, out_dim, grid, tile, tmp_path, capsys):
    gen = torch.Generator().manual_seed(3)
    tiles = torch.randn(grid[0] * grid[1], *tile, generator=gen)
    src, dst = tmp_path / "tiles.pt", tmp_path / "adapter.safetensors"
    torch.save(tiles, src)
    assert run_cli(["convert", str(src), "--in-dim", str(in_dim), "--out-dim", str(out_dim), "-o", str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    adapter = load_adapter(dst)
    spec = adapter.config.pipes[0]
    assert (spec.grid, spec.tile, spec.top_k) == (grid, tile, None)  # grid inferred
    assert torch.equal(adapter.pipe_list()[0].tiles, tiles)
    x = torch.randn(6, in_dim, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(adapter(x), seed_formula(tiles, grid, in_dim, out_dim, x), rtol=1e-12, atol=1e-12)


def test_explicit_grid_name_and_dtypes(tmp_path):
    tiles = torch.randn(4, 3, 3, dtype=torch.float64)
    src, dst = tmp_path / "t.pt", tmp_path / "a.safetensors"
    torch.save(tiles, src)
    # 4 workers of 3x3 over 3 -> 3: 1x4, 2x2 and 4x1 all cover, so the grid must be given
    assert run_cli(["convert", str(src), "--in-dim", "3", "--out-dim", "3", "-o", str(dst)]) == 2
    assert not dst.exists()
    assert (
        run_cli(
            [
                "convert",
                str(src),
                "--in-dim",
                "3",
                "--out-dim",
                "3",
                "--grid",
                "2",
                "2",
                "--name",
                "seed",
                "-o",
                str(dst),
            ]
        )
        == 0
    )
    a = load_adapter(dst)
    assert a.config.pipes[0].name == "seed" and a.config.pipes[0].grid == (2, 2)
    assert a.pipe_list()[0].tiles.dtype == torch.float32  # float64 is not a v1 dtype
    torch.save(tiles.half(), src)
    assert run_cli(["convert", str(src), "--in-dim", "3", "--out-dim", "3", "--grid", "1", "4", "-o", str(dst)]) == 0
    assert load_adapter(dst).pipe_list()[0].tiles.dtype == torch.float16


def test_infer_grid():
    assert infer_grid(512, (256, 128), 4096, 4096) == (16, 32)
    assert infer_grid(512, (192, 128), 8192, 1536) == (8, 64)
    assert infer_grid(6, (3, 2), 4, 9) == (3, 2)  # R >= 3 and C >= 2: only 3x2 of the pairs of 6
    with pytest.raises(PrismInputError, match="no grid"):
        infer_grid(6, (2, 2), 3, 8)  # needs R >= 4 and C >= 2: 8 workers
    with pytest.raises(PrismInputError, match="ambiguous.*1x4, 2x2, 4x1"):
        infer_grid(4, (3, 3), 3, 3)


class Payload:
    """A pickle that would create a file if it were ever unpickled with code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_tiles_files(tmp_path):
    marker = tmp_path / "code-ran"
    cases = {
        "code": ({"tiles": Payload(marker)}, "refused by torch.load"),
        "dict": ({"tiles": torch.zeros(4, 2, 2)}, "holds a dict"),
        "2d": (torch.zeros(8, 4), "expected 3 dims"),
        "int": (torch.zeros(4, 2, 2, dtype=torch.int32), "not a float type"),
        "nan": (torch.full((4, 2, 2), float("nan")), "NaN"),
        "empty": (torch.zeros(0, 2, 2), "empty dimension"),
    }
    paths = {}
    for name, (obj, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        paths[name] = (path, message)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle at all")
    paths["junk"] = (junk, "torch.load")
    paths["missing"] = (tmp_path / "missing.pt", "no such file")
    return marker, paths


@pytest.mark.parametrize("case", ["code", "dict", "2d", "int", "nan", "empty", "junk", "missing"])
def test_bad_tiles_files_exit_2_and_write_nothing(case, tmp_path, capsys):
    marker, paths = bad_tiles_files(tmp_path)
    path, message = paths[case]
    out = tmp_path / "out" / "a.safetensors"
    code = run_cli(["convert", str(path), "--in-dim", "4", "--out-dim", "4", "--grid", "2", "2", "-o", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert message in lines[0] and str(path) in lines[0]
    assert not out.exists() and not marker.exists()
    assert not (out.parent.exists() and any(out.parent.iterdir()))  # no temp file either


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--grid", "3", "2"], "6 workers, but the tensor holds 4"),
        (["--grid", "4", "1"], "spans 2 input columns"),
        (["--grid", "0", "4"], "--grid: 0 is not an integer in [1, "),
    ],
)
def test_bad_grid_exit_2(extra, message, tmp_path, capsys):
    src, out = tmp_path / "t.pt", tmp_path / "a.safetensors"
    torch.save(torch.zeros(4, 2, 2), src)
    assert run_cli(["convert", str(src), "--in-dim", "4", "--out-dim", "4", *extra, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_tiles_to_adapter_checks_dims():
    with pytest.raises(PrismInputError, match="--in-dim"):
        tiles_to_adapter(torch.zeros(1, 2, 2), 0, 2)


def test_load_seed_tiles_never_runs_code(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save(Payload(marker), path)
    with pytest.raises(PrismInputError, match="refused by torch.load"):
        load_seed_tiles(path)
    assert not marker.exists()


def test_convert_subprocess_prints_no_traceback(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save(Payload(marker), path)
    out = tmp_path / "a.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "prism_deploy", "convert", str(path), "--in-dim", "4", "--out-dim", "4", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.getcwd(),
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists() and not marker.exists()


def test_json_prints_one_object(tmp_path, capsys):
    """convert was the one command without --json."""
    import json

    tiles = torch.randn(6, 4, 7, generator=torch.Generator().manual_seed(0))
    src, dst = tmp_path / "tiles.pt", tmp_path / "adapter.safetensors"
    torch.save(tiles, src)
    assert run_cli(["convert", str(src), "--in-dim", "13", "--out-dim", "10", "-o", str(dst), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert (report["in_dim"], report["out_dim"], report["grid"], report["tile"]) == (13, 10, [3, 2], [4, 7])
    assert report["output"] == str(dst) and report["padding_workers"] == len(
        load_adapter(dst).config.pipes[0].padding_workers(13, 10)
    )
    assert captured.err == ""
