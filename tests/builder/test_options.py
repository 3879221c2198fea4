"""An engine's settings (``builder/options.py``) and an adapter build's (``BuildRequest``): options
checked where they are made, precisions parsed once and carried as ``Precision`` down to the
lowering."""

from __future__ import annotations

from pathlib import Path

import pytest

from prism_deploy.builder import adapter_source
from prism_deploy.builder.adapter_source import BuildRequest
from prism_deploy.builder.options import EngineConfig, Profile
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.precision import ModelPrecision, Precision
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.reference import random_adapter

SMALL = AdapterConfig(
    48, 40, (PipeSpec("plain", (2, 2), (20, 24)), PipeSpec("gated", (4, 3), (10, 16), top_k=4)), "weighted"
)


def test_engine_config_carries_a_typed_precision_and_writes_its_name():
    cfg = EngineConfig("ort-cpu", "int8-qdq", Profile(), calibrator="percentile")
    assert cfg.precision is Precision.INT8_QDQ and cfg.adapter_precision is Precision.INT8_QDQ
    assert cfg.id == "ort-cpu/int8-qdq/whole/b1-4-32.s1-64-1024/noplugin/calib-percentile"
    assert cfg.to_json()["precision"] == "int8-qdq" and type(cfg.to_json()["precision"]) is str
    back = EngineConfig.from_json(cfg.to_json())
    assert back == cfg and back.precision is Precision.INT8_QDQ
    model = EngineConfig("ort-cpu", "int4", Profile(), layout="graph")  # a model graph: its own precisions
    assert model.precision is ModelPrecision.INT4
    with pytest.raises(TypeError):
        model.adapter_precision
    assert EngineConfig("ort-cpu", "int4", Profile()).adapter_precision is Precision.INT4  # an adapter's int4
    with pytest.raises(PrismInputError, match="precision: 'fp8' is not one of"):
        EngineConfig("ort-cpu", "fp8", Profile())


def test_build_request_parses_names_and_checks_its_options_when_made(tmp_path):
    assert BuildRequest(adapter=tmp_path / "a", precisions=("fp16", Precision.INT8)).precisions == (
        Precision.FP16,
        Precision.INT8,
    )
    for kwargs, message in (
        ({"precisions": ("fp8",)}, "--precision: 'fp8'"),
        ({"plugin": "maybe"}, "--plugin: 'maybe'"),
        ({"forms": "fast"}, "--forms: 'fast'"),
        ({"precisions": ("int8-qdq",)}, "needs --calib FILE"),
        ({"calib": tmp_path / "none.npy"}, "--calib: .*no such file"),
    ):
        with pytest.raises(PrismInputError, match=message):
            BuildRequest(adapter=tmp_path / "a", **kwargs)
    calib = tmp_path / "c.npy"
    calib.write_bytes(b"")
    with pytest.raises(PrismInputError, match="--calibrator: 'mean'"):
        BuildRequest(adapter=tmp_path / "a", precisions=("int8-qdq",), calib=calib, calibrator="mean")
    BuildRequest(adapter=tmp_path / "a", calibrator="mean")  # unused without int8-qdq, as before


def test_the_lowering_receives_the_precision_the_request_was_given(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    random_adapter(SMALL, seed=0).save(path)
    source = adapter_source.AdapterSource(BuildRequest(adapter=path, precisions=("int8", "fp16")))
    units = source.units("ort-cpu")
    assert [u.config.precision for u in units] == [Precision.INT8, Precision.FP16]
    seen = []

    def fake_export(adapter, out, *, precision, **kwargs):
        seen.append(precision)
        raise RuntimeError("stop after the lowering is asked")

    monkeypatch.setattr("prism_deploy.lower.export_onnx", fake_export)
    with pytest.raises(RuntimeError, match="stop"):
        adapter_source.export_graph(source.data, Path(tmp_path / "x.onnx"), units[0].config, None)
    assert seen == [Precision.INT8] and type(seen[0]) is Precision
