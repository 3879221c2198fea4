"""A model over 2 GiB lets its PyTorch copy go while its graphs are quantized, and loads it
again for the validation: the export's result is the same as when it is held throughout.

The real case (model L, 3.3 GB) is measured in docs/quantized-models.md; here the size test
is forced on a tiny model so that the release and reload path runs in the default suite."""

from __future__ import annotations

import json

import pytest

from prism_deploy.models import lm_export
from prism_deploy.models.lm_export import export_model


@pytest.fixture
def released_loads(monkeypatch):
    """Every model counts as over 2 GiB; the list fills with each load of a PyTorch model."""
    loads = []
    real_load = lm_export.hf.load_causal_lm

    def counted(*args, **kwargs):
        loads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(lm_export, "_holds_over_2_gib", lambda model: True)
    monkeypatch.setattr(lm_export.hf, "load_causal_lm", counted)
    return loads


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_released_model_exports_and_validates_as_a_held_one(zoo, tmp_path, request, precision):
    held = export_model(zoo["qwen2"], "last", tmp_path / "held", precision=precision, max_seq=32)
    loads = request.getfixturevalue("released_loads")  # from here on, models are let go
    released = export_model(zoo["qwen2"], "last", tmp_path / "released", precision=precision, max_seq=32)
    assert len(loads) == 2  # once to trace, once more to validate
    for key in ("graph", "graph_with_past"):
        assert released["files"][key]["sha256"] == held["files"][key]["sha256"]
    assert released["validation"] == held["validation"]
    assert released["family"] == held["family"] and released["eos_token_id"] == held["eos_token_id"]
    assert json.loads((tmp_path / "released" / "model.json").read_text())["precision"] == precision


def test_without_validation_the_model_is_loaded_once(zoo, tmp_path, released_loads):
    manifest = export_model(zoo["qwen2"], "last", tmp_path / "q", precision="int8", max_seq=32, validate=False)
    assert len(released_loads) == 1 and manifest["validation"] == {"skipped": True}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_graphs_are_validated_with_the_pytorch_model_let_go(zoo, tmp_path, monkeypatch, precision):
    """Validation runs the float model first and opens the exported graphs' sessions only once
    it is gone (models/export_checks.py): no PyTorch model is alive when a session opens."""
    import gc
    import weakref

    from prism_deploy.core import ort_session

    models, sessions_opened = [], []
    real_load, real_session = lm_export.hf.load_causal_lm, ort_session.make_session

    def tracked_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        models.append(weakref.ref(model))
        return model

    def checked_session(*args, **kwargs):
        gc.collect()
        sessions_opened.append([m for m in models if m() is not None])
        return real_session(*args, **kwargs)

    monkeypatch.setattr(lm_export.hf, "load_causal_lm", tracked_load)
    monkeypatch.setattr(ort_session, "make_session", checked_session)
    manifest = export_model(zoo["qwen2"], "last", tmp_path / "m", precision=precision, max_seq=32)
    assert manifest["validation"]["logits"] and manifest["validation"]["logits_with_past"]
    # the plain graph and the KV-cache graph on random inputs, then both on real text
    assert models and len(sessions_opened) == 4 and "real_text" in manifest["validation"]
    assert sessions_opened == [[], [], [], []]
