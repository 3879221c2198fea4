"""``prism-deploy build`` on this CPU machine: engines, manifest, cache, loading, failures.

The ONNX Runtime CPU target is what ``--target auto`` picks without a GPU; every check here
runs the built engines and compares them with the PyTorch reference.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from prism_deploy.builder import adapter_source, loop
from prism_deploy.cli.main import main
from prism_deploy.core import targets
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.format.engine_manifest import EngineFileError, read_manifest
from prism_deploy.reference import random_adapter
from prism_deploy.runtime import load_engines
from prism_deploy.target_backends import onnxruntime as ort_engine

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "demo-adapter.safetensors"
# The shipped example's layout (examples/demo-adapter.safetensors), for when the file is absent.
DEMO_CONFIG = AdapterConfig(
    256,
    160,
    (
        PipeSpec("dense", (4, 4), (40, 64)),
        PipeSpec("routed", (8, 8), (20, 32), top_k=16),
        PipeSpec("coarse", (2, 4), (80, 64), top_k=3),
    ),
    "weighted",
)
SMALL_CONFIG = AdapterConfig(
    48,
    40,
    (
        PipeSpec("plain", (2, 2), (20, 24)),
        PipeSpec("gated", (4, 3), (10, 16), top_k=4, gate_scale=1.5),
    ),
    "weighted",
)
# small profile: parity runs 2 batches of 2x8 tokens
FAST = ["--batch", "1:2:4", "--seq", "1:8:16"]


def _adapter(tmp_path: Path, config: AdapterConfig = SMALL_CONFIG, seed: int = 0, name: str = "small") -> Path:
    path = tmp_path / f"{name}.safetensors"
    random_adapter(config, seed=seed).save(path)
    return path


def _build(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["build", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _reference(adapter_path: Path, x: np.ndarray) -> np.ndarray:
    from prism_deploy.reference import load_adapter

    return load_adapter(adapter_path)(torch.from_numpy(x).double()).numpy()


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_example_builds_on_cpu_prints_parity_and_second_run_reuses(tmp_path, capsys, monkeypatch):
    if EXAMPLE.is_file():
        adapter = tmp_path / EXAMPLE.name
        shutil.copy(EXAMPLE, adapter)
    else:
        adapter = _adapter(tmp_path, DEMO_CONFIG, seed=7, name="demo-adapter")
    monkeypatch.chdir(tmp_path)  # the default DIR is relative: engines/<stem>-<sha8>/
    code, out, _ = _build(capsys, str(adapter), *FAST)
    assert code == 0, out
    assert out.startswith("target: ort-cpu:")
    from prism_deploy.format import file_sha256

    directory = tmp_path / "engines" / f"demo-adapter-{file_sha256(adapter)[:8]}"
    manifest = read_manifest(directory)
    assert manifest is not None and manifest["adapter"]["sha256"] == file_sha256(adapter)
    [entry] = manifest["engines"]
    assert entry["configuration"]["precision"] == "fp32" and entry["target"] == "ort-cpu"
    assert entry["tools"]["onnxruntime"] and entry["tools"]["prism_deploy"]
    rel = entry["parity"]["rel_l2"]
    assert rel < 1e-5
    assert "built (cache miss)" in out and f"{rel:.4g}" in out  # the table shows the parity figure

    before = (directory / "manifest.json").read_bytes()
    code, out, _ = _build(capsys, str(adapter), *FAST)
    assert code == 0
    assert "reused (cache hit)" in out and "(unchanged)" in out
    assert (directory / "manifest.json").read_bytes() == before

    x = np.random.default_rng(1).standard_normal((3, 5, 256)).astype(np.float32)
    engines = load_engines(directory, precision="fp32", target="ort-cpu")
    y = engines.run(x)
    assert y.shape == (3, 5, 160) and y.dtype == np.float32
    assert _rel_l2(y, _reference(adapter, x)) < 1e-5
    np.testing.assert_allclose(engines.run(x[1].astype(np.float64)), y[1], rtol=1e-6, atol=1e-6)  # [tokens, in]


def test_changed_adapter_rebuilds_and_collects_old_engine(tmp_path, capsys):
    adapter, out_dir = _adapter(tmp_path), tmp_path / "eng"
    assert _build(capsys, str(adapter), "-o", str(out_dir), "--target", "ort-cpu", *FAST)[0] == 0
    old_files = [p["file"] for p in read_manifest(out_dir)["engines"][0]["parts"]]  # one per chosen gated form
    _adapter(tmp_path, seed=1)  # retrained: same file name and topology, new weights
    code, out, _ = _build(capsys, str(adapter), "-o", str(out_dir), "--target", "ort-cpu", *FAST)
    assert code == 0 and "built (cache miss)" in out
    manifest = read_manifest(out_dir)
    [entry] = manifest["engines"]
    assert old_files and not {p["file"] for p in entry["parts"]} & set(old_files)
    assert not any((out_dir / f).exists() for f in old_files)
    x = np.random.default_rng(2).standard_normal((2, 3, 48)).astype(np.float32)
    assert _rel_l2(load_engines(out_dir).run(x), _reference(adapter, x)) < 1e-5


def test_changed_tool_version_rebuilds_and_stale_engine_is_refused(tmp_path, capsys, monkeypatch):
    adapter, out_dir = _adapter(tmp_path), tmp_path / "eng"
    args = [str(adapter), "-o", str(out_dir), "--target", "ort-cpu", *FAST]
    assert _build(capsys, *args)[0] == 0
    real = targets.tool_versions

    def upgraded(target: str) -> dict[str, str | None]:
        return {**real(target), "onnxruntime": "99.0.0"}

    monkeypatch.setattr(targets, "tool_versions", upgraded)
    code, out, _ = _build(capsys, *args)
    assert code == 0 and "built (cache miss)" in out
    assert read_manifest(out_dir)["engines"][0]["tools"]["onnxruntime"] == "99.0.0"
    code, out, _ = _build(capsys, *args)
    assert "reused (cache hit)" in out
    monkeypatch.setattr(targets, "tool_versions", real)  # back to the real version
    with pytest.raises(EngineFileError, match="built with onnxruntime 99.0.0"):
        load_engines(out_dir)


def test_corrupt_engine_is_refused_on_load_and_rebuilt(tmp_path, capsys):
    adapter, out_dir = _adapter(tmp_path), tmp_path / "eng"
    args = [str(adapter), "-o", str(out_dir), "--target", "ort-cpu", *FAST]
    assert _build(capsys, *args)[0] == 0
    part = read_manifest(out_dir)["engines"][0]["parts"][0]  # gated pipes: one part per chosen form
    engine = out_dir / part["file"]
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(EngineFileError, match="does not match the manifest"):
        load_engines(out_dir)
    engine.unlink()
    with pytest.raises(EngineFileError, match="missing"):
        load_engines(out_dir)
    code, out, _ = _build(capsys, *args)  # the cache notices and rebuilds
    assert code == 0 and "built (cache miss)" in out
    load_engines(out_dir)


def test_concurrent_builds_into_one_dir_leave_a_valid_manifest(tmp_path):
    adapter, out_dir = _adapter(tmp_path), tmp_path / "eng"
    codes: dict[str, int] = {}

    def build(precision: str) -> None:
        codes[precision] = main(
            [
                "build",
                str(adapter),
                "-o",
                str(out_dir),
                "--target",
                "ort-cpu",
                "--precision",
                precision,
                "--json",
                *FAST,
            ]
        )

    threads = [threading.Thread(target=build, args=(p,)) for p in ("fp32", "fp16")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == {"fp32": 0, "fp16": 0}
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert sorted(e["configuration"]["precision"] for e in manifest["engines"]) == ["fp16", "fp32"]
    x = np.random.default_rng(3).standard_normal((2, 4, 48)).astype(np.float32)
    ref = _reference(adapter, x)
    for precision, tol in (("fp32", 1e-5), ("fp16", 2e-2)):
        assert _rel_l2(load_engines(out_dir, precision=precision).run(x), ref) < tol
    assert not list(out_dir.glob(".build-*"))  # no temporary folder left behind


def test_failed_parity_keeps_previous_engines_and_manifest(tmp_path, capsys, monkeypatch):
    adapter, out_dir = _adapter(tmp_path), tmp_path / "eng"
    args = [str(adapter), "-o", str(out_dir), "--target", "ort-cpu", *FAST]
    assert _build(capsys, *args)[0] == 0
    before = (out_dir / "manifest.json").read_bytes()
    real_export = adapter_source.export_graph

    def sabotaged(unit, path, cfg, calib, **kw):  # an engine of other weights: parity must catch it
        return real_export(random_adapter(unit.config, seed=99).arrays(), path, cfg, calib, **kw)

    monkeypatch.setattr(adapter_source, "export_graph", sabotaged)
    code, out, err = _build(capsys, *args, "--force")
    assert code == 1
    assert err.count("\n") == 1 and "ort-cpu/fp32/whole" in err and "rel_l2 " in err and "> 1e-05" in err
    assert (out_dir / "manifest.json").read_bytes() == before
    x = np.random.default_rng(4).standard_normal((1, 6, 48)).astype(np.float32)
    assert _rel_l2(load_engines(out_dir).run(x), _reference(adapter, x)) < 1e-5


def test_per_pipe_engines_sum_to_the_whole_adapter_engine(tmp_path, capsys):
    adapter, out_dir = _adapter(tmp_path), tmp_path / "eng"
    for extra in ([], ["--per-pipe"]):
        assert _build(capsys, str(adapter), "-o", str(out_dir), "--target", "ort-cpu", *FAST, *extra)[0] == 0
    whole = load_engines(out_dir, per_pipe=False)
    split = load_engines(out_dir, per_pipe=True)
    assert [p["pipe_name"] for p in split.entry["parts"]] == ["plain", "gated"]
    assert len(split.parts) == 2 and split.entry["combine_weights"] != [1.0, 1.0]
    x = np.random.default_rng(5).standard_normal((2, 7, 48)).astype(np.float32)
    np.testing.assert_allclose(split.run(x), whole.run(x), rtol=1e-5, atol=1e-5)
    # each part is its pipe alone, before the combine weight
    from prism_deploy.reference import load_adapter

    pipes = load_adapter(adapter).pipe_outputs(torch.from_numpy(x).double())
    for (weight, runner), ref in zip(split.parts, pipes):
        assert _rel_l2(runner.run(x), ref.numpy()) < 1e-5
    with pytest.raises(EngineFileError, match="2 engines match"):
        load_engines(out_dir)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch", "1:2"], "--batch"),
        (["--batch", "8:2:16"], "--batch"),
        (["--seq", "a:b:c"], "--seq"),
        (["--precision", "fp8"], "--precision"),
        (["--precision", ""], "--precision"),
        (["--target", "tpu"], "--target"),
        (["--target", "ort-cpu", "--precision", "int8-qdq"], "--calib"),
        (["--target", "ort-cpu", "--plugin", "on"], "--plugin"),
        (["--target", "ort-cpu", "--plugin", "maybe"], "--plugin"),
        (["--target", "ort-cpu", "--refittable"], "--refittable"),
        (["--target", "ort-cpu", "--calib", "/nonexistent.npy"], "--calib"),
    ],
)
def test_bad_input_exits_2_with_one_error_line(tmp_path, capsys, extra, message):
    adapter = _adapter(tmp_path)
    code, out, err = _build(capsys, str(adapter), "-o", str(tmp_path / "eng"), *extra)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "eng" / "manifest.json").exists()


@pytest.mark.parametrize("target", ["trt", "ort-cuda"])
def test_unavailable_target_exits_2(tmp_path, capsys, target):
    code, _, err = _build(capsys, str(_adapter(tmp_path)), "--target", target)
    assert code == 2 and err.count("\n") == 1 and f"--target {target}: unavailable here" in err


def test_output_that_is_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "eng").write_text("not a folder")
    code, _, err = _build(capsys, str(_adapter(tmp_path)), "-o", str(tmp_path / "eng"), "--target", "ort-cpu")
    assert code == 2 and err.count("\n") == 1 and "is not a folder" in err


def test_json_output_is_one_object_with_the_manifest_entries(tmp_path, capsys):
    adapter, out_dir = _adapter(tmp_path), tmp_path / "eng"
    code, out, _ = _build(capsys, str(adapter), "-o", str(out_dir), "--target", "ort-cpu", "--json", *FAST)
    assert code == 0
    obj = json.loads(out)
    assert obj["target"] == "ort-cpu" and obj["manifest_written"] is True
    [engine] = obj["engines"]
    assert engine["action"] == "built" and engine["entry"] == read_manifest(out_dir)["engines"][0]


def test_missing_or_invalid_adapter_exits_2(tmp_path, capsys):
    code, _, err = _build(capsys, str(tmp_path / "absent.safetensors"))
    assert code == 2 and "no such file" in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    code, _, err = _build(capsys, str(bad))
    assert code == 2 and err.count("\n") == 1 and str(bad) in err


def test_load_without_manifest_is_a_clean_error(tmp_path):
    with pytest.raises(EngineFileError, match="no manifest.json"):
        load_engines(tmp_path)


def test_crash_mid_build_leaves_previous_engines_and_manifest(tmp_path, capsys, monkeypatch):
    adapter, out_dir = _adapter(tmp_path), tmp_path / "eng"
    args = [str(adapter), "-o", str(out_dir), "--target", "ort-cpu", *FAST]
    assert _build(capsys, *args)[0] == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()}

    def crash(onnx_path, engine_path, target, **options):
        engine_path.write_bytes(b"half an engine")
        raise KeyboardInterrupt

    monkeypatch.setattr(ort_engine, "build_ort_engine", crash)
    assert _build(capsys, *args, "--force", "--precision", "fp32,fp16")[0] == 130
    assert {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()} == before
    assert not list(out_dir.glob(".build-*"))
    load_engines(out_dir).run(np.zeros((1, 2, 48), np.float32))


def test_a_build_error_fails_that_configuration_only(tmp_path, capsys, monkeypatch):
    adapter, out_dir = _adapter(tmp_path), tmp_path / "eng"
    from prism_deploy.core.errors import PrismInputError

    real = ort_engine.build_ort_engine

    def refuse_fp16(onnx_path, engine_path, target, **options):
        if "fp16" in onnx_path.name:
            raise PrismInputError(f"{onnx_path}: ONNX Runtime cannot load it (test)")
        return real(onnx_path, engine_path, target, **options)

    monkeypatch.setattr(ort_engine, "build_ort_engine", refuse_fp16)
    code, out, err = _build(
        capsys, str(adapter), "-o", str(out_dir), "--target", "ort-cpu", "--precision", "fp16,fp32", *FAST
    )
    assert code == 1 and "ort-cpu/fp16/whole" in err and "ONNX Runtime build failed" in err
    assert [e["configuration"]["precision"] for e in read_manifest(out_dir)["engines"]] == ["fp32"]


def test_a_second_build_waits_for_the_lock(tmp_path):
    from prism_deploy.core.fsutil import folder_lock

    adapter, out_dir = _adapter(tmp_path), tmp_path / "eng"
    out_dir.mkdir()
    codes: list[int] = []
    with folder_lock(out_dir, loop.LOCK_NAME):
        t = threading.Thread(
            target=lambda: codes.append(
                main(["build", str(adapter), "-o", str(out_dir), "--target", "ort-cpu", "--json", *FAST])
            )
        )
        t.start()
        t.join(timeout=1.0)
        assert t.is_alive() and not (out_dir / "manifest.json").exists()  # blocked on the lock
    t.join()
    assert codes == [0] and read_manifest(out_dir) is not None
    assert not (out_dir / loop.LOCK_NAME).exists()  # the folder itself is locked: no lock file is left


def test_retrained_adapter_keeps_topology_key_and_finds_refit_source(tmp_path):
    """Cache keys: new weights change the cache key, never the topology key; a refittable
    TensorRT engine of the same topology in a sibling folder is found as the refit source."""
    from prism_deploy.builder.options import EngineConfig, Profile
    from prism_deploy.format import file_sha256
    from prism_deploy.format.engine_manifest import new_manifest, write_manifest

    a0, a1 = _adapter(tmp_path, seed=0, name="a"), tmp_path / "a1.safetensors"
    random_adapter(SMALL_CONFIG, seed=1).save(a1)
    cfg = EngineConfig("trt", "fp16", Profile(), plugin=False, refittable=True)
    tools, device = {"tensorrt": "10.13"}, {"kind": "gpu", "name": "H100", "compute_capability": "9.0"}
    topo = SMALL_CONFIG.topology()
    keys = [loop.cache_key(loop.Unit(cfg, {"adapter": file_sha256(a)}, cfg.id), tools, device) for a in (a0, a1)]
    assert keys[0] != keys[1]
    tkey = adapter_source.topology_key(topo, cfg, tools, device)
    other = AdapterConfig(
        48,
        40,
        (PipeSpec("plain", (2, 2), (20, 24)), PipeSpec("gated", (4, 3), (10, 16), top_k=5, gate_scale=1.5)),
        "weighted",
    )
    assert adapter_source.topology_key(other.topology(), cfg, tools, device) != tkey
    assert adapter_source.topology_key(topo, cfg, tools, {**device, "compute_capability": "8.0"}) != tkey

    old_dir = tmp_path / "engines" / f"a-{keys[0][:8]}"
    old_dir.mkdir(parents=True)
    (old_dir / "x.engine").write_bytes(b"plan")
    part = {
        "pipe": None,
        "pipe_name": None,
        "file": "x.engine",
        "sha256": file_sha256(old_dir / "x.engine"),
        "bytes": 4,
    }
    entry = {
        "id": cfg.id,
        "configuration": cfg.to_json(),
        "target": "trt",
        "parts": [part],
        "tools": tools,
        "device": device,
        "cache_key": keys[0],
        "topology_key": tkey,
    }
    write_manifest(
        old_dir,
        new_manifest({"file": "a.safetensors", "sha256": file_sha256(a0), "config": SMALL_CONFIG.to_json()}, [entry]),
    )
    source = adapter_source.AdapterSource(adapter_source.BuildRequest(adapter=tmp_path / "a.safetensors"))
    new_dir = tmp_path / "engines" / "a-new"
    unit = loop.Unit(cfg, {}, cfg.id, topology_key=tkey)
    found = source.refit_source(unit, new_dir, None)
    assert found is not None and found[0] == old_dir
    assert source.refit_source(loop.Unit(cfg, {}, cfg.id, topology_key="another-topology"), new_dir, None) is None
    (old_dir / "x.engine").write_bytes(b"corrupt")  # a corrupt source is never refit
    assert source.refit_source(unit, new_dir, None) is None


def test_engine_for_a_missing_provider_is_refused(tmp_path, capsys):
    adapter, out_dir = _adapter(tmp_path), tmp_path / "eng"
    assert _build(capsys, str(adapter), "-o", str(out_dir), "--target", "ort-cpu", *FAST)[0] == 0
    manifest = json.loads((out_dir / "manifest.json").read_text())
    manifest["engines"][0]["target"] = "ort-cuda"  # as if copied from a GPU machine
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFileError, match="needs ONNX Runtime's CUDA provider"):
        load_engines(out_dir)


def test_large_model_engine_keeps_its_weights_in_a_checked_data_file(tmp_path, capsys, monkeypatch):
    """Over 2 GiB an optimized model cannot be one protobuf: its initializers go to a data file.
    The threshold is lowered here so that a small adapter takes the same path."""
    monkeypatch.setattr(ort_engine, "ORT_EXTERNAL_THRESHOLD", 0)
    adapter, out_dir = _adapter(tmp_path), tmp_path / "eng"
    assert _build(capsys, str(adapter), "-o", str(out_dir), "--target", "ort-cpu", *FAST)[0] == 0
    parts = read_manifest(out_dir)["engines"][0]["parts"]  # one per chosen gated form
    for part in parts:
        data = out_dir / part["data_file"]
        assert part["data_file"].endswith(".ort.data") and data.stat().st_size == part["data_bytes"] > 4 * 48 * 40
        assert (out_dir / part["file"]).stat().st_size < data.stat().st_size  # the weights are outside
    data = out_dir / parts[0]["data_file"]
    x = np.random.default_rng(6).standard_normal((2, 3, 48)).astype(np.float32)
    assert _rel_l2(load_engines(out_dir).run(x), _reference(adapter, x)) < 1e-5
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(EngineFileError, match="does not match the manifest"):
        load_engines(out_dir)


def test_trt_input_graph_with_the_plugin_matches_the_reference_on_the_twin(tmp_path):
    """What a ``trt`` build with the plugin hands TensorRT: the export, fused. It cannot be built
    here, but its numbers can be checked on ONNX Runtime through the plugin's Python twin."""
    import onnx

    from prism_deploy.builder.options import EngineConfig, Profile
    from prism_deploy.fuse.tile_dispatch_twin import make_twin_session

    adapter = random_adapter(SMALL_CONFIG, seed=3)
    path = tmp_path / "fused.onnx"
    cfg = EngineConfig("trt", "fp32", Profile(), plugin=True)
    adapter_source.export_graph(adapter.arrays(), path, cfg, None)
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node].count("tile_dispatch") == 1  # the one gated pipe
    x = np.random.default_rng(8).standard_normal((2, 5, 48)).astype(np.float32)
    y = make_twin_session(model).run(["adapted"], {"hidden": x})[0]
    assert _rel_l2(y, adapter(torch.from_numpy(x).double()).numpy()) < 1e-5


def test_the_parity_gate_runs_a_bounded_shape_whatever_the_profile():
    """``--batch 1:100000:100000`` was killed for memory: the gate compared 6.4 million tokens."""
    from prism_deploy.builder.options import Profile
    from prism_deploy.parity.build_checks import PARITY_TOKENS, checked_shape

    assert checked_shape(Profile((1, 100_000, 100_000), (1, 64, 1024))) == (PARITY_TOKENS // 64, 64)
    assert checked_shape(Profile((1, 4, 32), (1, 64, 1024))) == (4, 64)
    assert checked_shape(Profile((1, 1, 1), (1, 1 << 20, 1 << 20))) == (1, PARITY_TOKENS)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_session_skips_prepacking_and_writes_the_same_model(tmp_path, precision, monkeypatch):
    """The offline optimization opens its session without prepacking (a second copy of each
    weight, docs/onnx-lowering.md "Memory"); the file it writes is the same as with it."""
    import hashlib

    from prism_deploy.core import ort_session
    from prism_deploy.lower import export_onnx

    export_onnx(random_adapter(SMALL_CONFIG, seed=0), tmp_path / "m.onnx", precision=precision)
    configs = []
    real = ort_session.make_session

    def spy(*args, **kwargs):
        configs.append(dict(kwargs.get("session_config") or {}))
        return real(*args, **kwargs)

    monkeypatch.setattr(ort_session, "make_session", spy)
    ort_engine.build_ort_engine(tmp_path / "m.onnx", tmp_path / "built.onnx", "ort-cpu", precision=precision)
    assert configs == [{"session.disable_prepacking": "1"}]
    real(
        tmp_path / "m.onnx",
        "cpu",
        optimized_model_path=str(tmp_path / "prepacked.onnx"),
        graph_optimization_level=ort_engine.BUILD_OPTIMIZATION_LEVEL,
    )
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("built.onnx", "prepacked.onnx")]
    assert digest[0] == digest[1]
