"""The backend object per target (prism_deploy.target_backends): what each target says about
itself, the environment checks it makes on an engine, and an ONNX Runtime build opened again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prism_deploy.core import targets
from prism_deploy.core.errors import CheckFailed, PrismInputError
from prism_deploy.core.targets import Target
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.format.engine_manifest import EngineFileError
from prism_deploy.target_backends import BACKENDS, EngineBuild, backend_for, graph_backend
from prism_deploy.target_backends import onnxruntime as ort_backend

CONFIG = AdapterConfig(16, 12, (PipeSpec("plain", (1, 1), (12, 16)),), "weighted")

# What the package used to decide with `if target == ...` in 13 files, per target.
EXPECTED = {
    Target.TRT: dict(
        provider="cuda",
        gpu=True,
        fuses_plugin=True,
        refits=True,
        times_gated_forms=False,
        nbits_export=False,
        takes_nbits_models=False,
        opens_model_graphs=False,
        answers_zero_tokens=False,
        triton_platform=("tensorrt_plan", "model.plan"),
        runtime_tool="tensorrt",
    ),
    Target.ORT_CUDA: dict(
        provider="cuda",
        gpu=True,
        fuses_plugin=False,
        refits=False,
        times_gated_forms=True,
        nbits_export=False,
        takes_nbits_models=True,
        opens_model_graphs=True,
        answers_zero_tokens=True,
        triton_platform=("onnxruntime_onnx", "model.onnx"),
        runtime_tool="onnxruntime",
    ),
    Target.ORT_CPU: dict(
        provider="cpu",
        gpu=False,
        fuses_plugin=False,
        refits=False,
        times_gated_forms=True,
        nbits_export=True,
        takes_nbits_models=True,
        opens_model_graphs=True,
        answers_zero_tokens=True,
        triton_platform=("onnxruntime_onnx", "model.onnx"),
        runtime_tool="onnxruntime",
    ),
}


def test_every_target_has_one_backend():
    assert set(BACKENDS) == set(Target)
    for target, backend in BACKENDS.items():
        assert backend.target is target
        assert backend_for(target) is backend and backend_for(target.value) is backend
        assert str(backend) == target.value


@pytest.mark.parametrize("target", list(Target), ids=str)
def test_each_backend_says_what_its_target_does(target):
    backend = backend_for(target)
    assert {k: getattr(backend, k) for k in EXPECTED[target]} == EXPECTED[target]
    assert backend.provider == target.provider and backend.gpu == target.gpu
    # only TensorRT engines take the TensorRT engine options
    assert bool(backend.engine_options) == (target is Target.TRT)


def test_a_name_that_is_no_target_is_bad_input():
    with pytest.raises(PrismInputError, match="--target: 'openvino' is not one of"):
        backend_for("openvino")


def test_model_graphs_open_on_the_provider_s_onnx_runtime_target():
    assert graph_backend("cpu").target is Target.ORT_CPU
    assert graph_backend("cuda").target is Target.ORT_CUDA


def _entry(target: Target, tools: dict, **configuration) -> dict:
    return {
        "id": f"{target.value}/fp32/whole",
        "target": target.value,
        "tools": tools,
        "configuration": configuration,
        "device": {"compute_capability": "9.0"},
    }


def test_an_engine_of_another_runtime_version_is_refused():
    backend = backend_for("ort-cpu")
    here = targets.tool_versions(Target.ORT_CPU)["onnxruntime"]
    backend.check_environment(_entry(Target.ORT_CPU, {"onnxruntime": here}))
    with pytest.raises(EngineFileError, match="built with onnxruntime 0.0, this environment has"):
        backend.check_environment(_entry(Target.ORT_CPU, {"onnxruntime": "0.0"}))


def test_an_ort_cuda_engine_is_refused_without_the_cuda_provider(monkeypatch):
    here = targets.tool_versions(Target.ORT_CUDA)["onnxruntime"]
    monkeypatch.setattr(targets, "cuda_provider_available", lambda: (False, "no NVIDIA GPU on this machine"))
    with pytest.raises(EngineFileError, match="needs ONNX Runtime's CUDA provider"):
        backend_for("ort-cuda").check_environment(_entry(Target.ORT_CUDA, {"onnxruntime": here}))


def test_a_version_compatible_plan_takes_another_tensorrt_but_not_another_gpu(monkeypatch):
    monkeypatch.setattr(targets, "tool_versions", lambda target: {"tensorrt": "10.13"})
    monkeypatch.setattr(targets, "device_info", lambda target: {"kind": "gpu", "compute_capability": "9.0"})
    backend = backend_for("trt")
    backend.check_environment(_entry(Target.TRT, {"tensorrt": "10.9"}, version_compatible=True))
    with pytest.raises(EngineFileError, match="built with tensorrt 10.9, this environment has 10.13"):
        backend.check_environment(_entry(Target.TRT, {"tensorrt": "10.9"}))
    monkeypatch.setattr(targets, "device_info", lambda target: {"kind": "gpu", "compute_capability": "8.9"})
    with pytest.raises(EngineFileError, match="built for compute capability 9.0, this GPU is 8.9"):
        backend.check_environment(_entry(Target.TRT, {"tensorrt": "10.9"}, version_compatible=True))


def test_tensorrt_has_no_runner_for_model_graphs(tmp_path):
    with pytest.raises(EngineFileError, match="no TensorRT runner for model graphs"):
        backend_for("trt").open_graph(tmp_path / "x.engine", {"id": "trt/fp32/graph"}, lambda *a, **k: None)


def _exported(tmp_path: Path) -> Path:
    from prism_deploy.lower import export_onnx
    from prism_deploy.reference import random_adapter

    path = tmp_path / "adapter.onnx"
    export_onnx(random_adapter(CONFIG, seed=3), path, precision="fp32", io_dtype="float32")
    return path


def test_ort_cpu_builds_an_engine_that_opens_and_runs_like_its_source(tmp_path):
    from prism_deploy.runtime.onnx_runner import OnnxRunner

    source = _exported(tmp_path)
    backend = backend_for("ort-cpu")
    built = backend.build(source, tmp_path, "e", EngineBuild(precision="fp32", source_bytes=source.stat().st_size))
    assert built.suffix == ".ort.onnx" and built.session["provider"] == "cpu" and built.data_file is None
    entry = {"id": "ort-cpu/fp32/whole", "target": "ort-cpu", "session": built.session}
    runner = backend.open(Path(built.engine), entry, OnnxRunner.open, CONFIG.out_dim)
    assert runner.widths() == (CONFIG.in_dim, CONFIG.out_dim)
    hidden = np.random.default_rng(0).standard_normal((2, 5, CONFIG.in_dim), dtype=np.float32)
    want = OnnxRunner.open(source).run({"hidden": hidden}, ["adapted"])["adapted"]
    np.testing.assert_allclose(runner.run(hidden), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(EngineFileError, match="lacks its session record"):
        backend.open(Path(built.engine), {"id": "x", "target": "ort-cpu"}, OnnxRunner.open, CONFIG.out_dim)


def test_a_graph_onnx_runtime_refuses_is_a_failed_build(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PrismInputError("ONNX Runtime cannot load it (test)")

    monkeypatch.setattr(ort_backend, "build_ort_engine", refuse)
    with pytest.raises(CheckFailed, match="ONNX Runtime build failed: ONNX Runtime cannot load it"):
        backend_for("ort-cpu").build(tmp_path / "x.onnx", tmp_path, "e", EngineBuild())
