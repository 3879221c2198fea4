"""Parity: figures, selection matching, per-worker errors, and the CLI's exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prism_deploy.cli.main import main
from prism_deploy.core.targets import cuda_provider_available
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.lower import export_onnx
from prism_deploy.parity import check_parity, default_tolerances
from prism_deploy.reference import random_adapter
from prism_deploy.runtime.adapter_session import AdapterGraph

CFG = AdapterConfig(
    40,
    24,
    (
        PipeSpec("dense", (2, 2), (12, 20), None),
        PipeSpec("routed", (4, 4), (6, 10), 3, 2.0),
    ),
    "weighted",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    adapter = random_adapter(CFG, seed=7)
    adapter.save(d / "a.safetensors")
    random_adapter(CFG, seed=8).save(d / "other.safetensors")
    for precision in ("fp32", "int8"):
        export_onnx(adapter, d / f"{precision}.onnx", precision=precision)
    return d, adapter


def test_fp32_parity_passes(files):
    d, adapter = files
    rep = check_parity(adapter, d / "fp32.onnx", samples=2, batch=2, seq=4)
    assert rep.passed and rep.precision == "fp32" and rep.tokens == 16
    assert rep.rel_l2 < 1e-6 and rep.cosine > 0.999999
    assert rep.selection[0]["match_fraction"] == 1.0 and rep.selection[0]["tokens"] == 16
    assert all(w["error"] == 0.0 for w in rep.top_workers)  # fp32 stores the tiles exactly
    assert json.loads(json.dumps(rep.to_json()))["tolerances"] == default_tolerances("fp32")


def test_int8_worker_errors_are_the_quantization_errors(files):
    d, adapter = files
    rep = check_parity(adapter, d / "int8.onnx", samples=1, batch=1, seq=8)
    assert rep.passed and 1e-4 < rep.rel_l2 < 2e-2
    top = rep.top_workers
    assert len(top) == 10 and top[0]["error"] >= top[-1]["error"] > 0
    # recompute the largest one directly: the stored (dequantized) tile alone on the inputs
    w = top[0]
    pipe = adapter.pipe_list()[w["pipe"]]
    stored = AdapterGraph(d / "int8.onnx").stored_tiles()[w["pipe"]][w["worker"]]
    x = np.random.default_rng(0).standard_normal((1, 8, 40)).astype(np.float32).reshape(8, 40)
    tc = pipe.spec.tile_cols
    xp = np.pad(x, ((0, 0), (0, pipe.spec.padded_in - 40)))[:, w["c"] * tc : (w["c"] + 1) * tc]
    direct = np.linalg.norm(xp.astype(np.float64) @ (stored - pipe.tiles[w["worker"]].numpy()).T.astype(np.float64))
    assert direct == pytest.approx(w["error"], rel=1e-6)


def test_runner_without_extras_and_a_broken_runner(files):
    d, adapter = files

    class Plain:  # any object with .run(hidden) -> adapted
        def run(self, hidden):
            with torch.no_grad():
                return adapter(torch.from_numpy(hidden)).numpy()

    rep = check_parity(adapter, Plain(), precision="fp16", samples=1, batch=1, seq=4)
    assert rep.passed and rep.rel_l2 == 0.0 and rep.selection[0]["match_fraction"] is None

    class Broken(Plain):
        def run(self, hidden):
            return super().run(hidden) * 1.01

    rep = check_parity(adapter, Broken(), precision="fp32", samples=1, batch=1, seq=4)
    assert not rep.passed and any("rel_l2" in f for f in rep.failures)


def test_ambiguous_tokens_counted_apart(files):
    """A gate whose scores tie for the k-th place makes every token ambiguous."""
    _, adapter = files
    tied = random_adapter(CFG, seed=7)
    tied.pipe_list()[1].gate.weight.data.zero_()
    tied.pipe_list()[1].gate.bias.data.zero_()

    class Flipped:  # picks a different (equally good) set: must not count as a mismatch
        precision = "fp32"

        def run_with_selections(self, hidden):
            with torch.no_grad():
                y = tied(torch.from_numpy(hidden)).numpy()
            n = hidden.shape[0] * hidden.shape[1]
            return y, {1: np.tile(np.array([[15, 14, 13]]), (n, 1))}

    rep = check_parity(tied, Flipped(), samples=1, batch=2, seq=3)
    s = rep.selection[0]
    assert s["ambiguous"] == 6 and s["match_fraction"] == 1.0 and rep.passed


def test_cli_exit_codes(files, capsys):
    d, _ = files
    assert (
        main(
            [
                "parity",
                str(d / "a.safetensors"),
                "--onnx",
                str(d / "int8.onnx"),
                "--provider",
                "cpu",
                "--samples",
                "1",
                "--seq",
                "4",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] and out["precision"] == "int8" and out["provider"] == "cpu"
    # the wrong adapter: said before any number is compared -> exit 1
    assert (
        main(
            [
                "parity",
                str(d / "other.safetensors"),
                "--onnx",
                str(d / "fp32.onnx"),
                "--provider",
                "cpu",
                "--samples",
                "1",
                "--seq",
                "4",
            ]
        )
        == 1
    )
    assert "lowered from another adapter" in capsys.readouterr().err
    # the right adapter, a graph whose weights changed after export: the check runs and fails -> exit 1
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(d / "fp32.onnx"))
    biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    biggest.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(biggest) * 1.5, biggest.name))
    onnx.save(model, str(d / "tampered.onnx"))
    assert (
        main(
            [
                "parity",
                str(d / "a.safetensors"),
                "--onnx",
                str(d / "tampered.onnx"),
                "--provider",
                "cpu",
                "--samples",
                "1",
                "--seq",
                "4",
            ]
        )
        == 1
    )
    assert "FAILED" in capsys.readouterr().out
    # bad input -> exit 2 with one error line
    assert main(["parity", str(d / "a.safetensors"), "--onnx", str(d / "missing.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_cli_export_and_int8_qdq_without_calib(files, capsys, tmp_path):
    d, _ = files
    assert main(["export", str(d / "a.safetensors"), "-o", str(tmp_path / "q.onnx"), "--precision", "int8-qdq"]) == 2
    assert "--calib" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((64, 40)).astype(np.float32))
    assert (
        main(
            [
                "export",
                str(d / "a.safetensors"),
                "-o",
                str(tmp_path / "q.onnx"),
                "--precision",
                "int8-qdq",
                "--calib",
                str(calib),
                "--calibrator",
                "percentile",
                "--json",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["precision"] == "int8-qdq" and res["metadata"]["pipes"][1]["node_prefix"] == "routed/"
    assert (
        main(
            [
                "parity",
                str(d / "a.safetensors"),
                "--onnx",
                str(tmp_path / "q.onnx"),
                "--provider",
                "auto",
                "--samples",
                "1",
                "--seq",
                "4",
            ]
        )
        == 0
    )


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_provider_available()[0], reason=f"CUDA provider: {cuda_provider_available()[1]}")
def test_parity_on_cuda_provider(files):
    d, adapter = files
    for precision in ("fp32", "int8"):
        rep = check_parity(adapter, AdapterGraph(d / f"{precision}.onnx", "cuda"), samples=2, batch=2, seq=8)
        assert rep.passed, rep.failures


def test_parity_with_inputs_file_and_float16_io(files, tmp_path):
    d, adapter = files
    rows = np.random.default_rng(3).standard_normal((37, 40)).astype(np.float32)
    np.save(tmp_path / "h.npy", rows)
    export_onnx(adapter, tmp_path / "h16.onnx", precision="fp16", io_dtype="float16")
    rep = check_parity(adapter, tmp_path / "h16.onnx", inputs=tmp_path / "h.npy", batch=2, seq=8)
    assert rep.tokens == 37 and rep.passed
    assert rep.tolerances["rel_l2_max"] == 2e-3  # fp16 default, above the float16-io floor
    with pytest.raises(Exception, match=r"\[n, 40\]"):
        check_parity(adapter, tmp_path / "h16.onnx", inputs=np.zeros((3, 7), np.float32))


def test_cli_export_bad_calib(files, tmp_path, capsys):
    d, _ = files
    np.save(tmp_path / "bad.npy", np.zeros((5, 3), np.float32))
    for calib in ("bad.npy", "missing.npy"):
        assert (
            main(
                [
                    "export",
                    str(d / "a.safetensors"),
                    "-o",
                    str(tmp_path / "q.onnx"),
                    "--precision",
                    "int8-qdq",
                    "--calib",
                    str(tmp_path / calib),
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and calib in err[0]
    assert not (tmp_path / "q.onnx").exists()


def test_a_graph_is_checked_only_against_the_adapter_it_was_lowered_from(tmp_path, capsys):
    """Issue 17: parity against another adapter's graph says so before comparing any number."""
    from prism_deploy.cli.main import main
    from prism_deploy.format import read_adapter_file, write_adapter_file
    from prism_deploy.lower import export_onnx
    from prism_deploy.reference import random_adapter, simple_config

    source = random_adapter(simple_config(24, 20, (2, 2), top_k=2), seed=3)
    source.save(tmp_path / "a.safetensors")
    export_onnx(source, tmp_path / "a.onnx")
    stored = read_adapter_file(tmp_path / "a.safetensors")
    tensors = {k: v.copy() for k, v in stored.tensors.items()}
    tensors["pipes.0.tiles"][1] *= 2  # one worker's weights changed: same layout, another adapter
    write_adapter_file(tmp_path / "b.safetensors", stored.config, tensors)
    random_adapter(simple_config(24, 20, (4, 1)), seed=3).save(tmp_path / "c.safetensors")

    assert main(["parity", str(tmp_path / "a.safetensors"), "--onnx", str(tmp_path / "a.onnx")]) == 0
    capsys.readouterr()
    assert main(["parity", str(tmp_path / "b.safetensors"), "--onnx", str(tmp_path / "a.onnx")]) == 1
    out = capsys.readouterr()
    assert "lowered from another adapter of the same layout" in out.err and "worker" not in out.out
    assert main(["parity", str(tmp_path / "c.safetensors"), "--onnx", str(tmp_path / "a.onnx")]) == 2
    assert "lowered from an adapter of another layout" in capsys.readouterr().err
