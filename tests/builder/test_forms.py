"""The gated form chosen per token bucket at build, by (injected) timings: a planted slow form is
never chosen, the choice follows from the recorded timings, the runtime runs the bucket's
form, and version-1 manifests are still read. No timing is asserted anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prism_deploy.builder import BuildRequest, build_engines
from prism_deploy.builder.forms import CANDIDATE_FORMS, choose_form, token_buckets
from prism_deploy.builder.options import Profile
from prism_deploy.format import AdapterConfig, PipeSpec
from prism_deploy.format.engine_manifest import EngineFileError, read_manifest
from prism_deploy.reference import load_adapter, random_adapter
from prism_deploy.runtime import load_engines

TINY = AdapterConfig(
    24,
    20,
    (PipeSpec("plain", (1, 1), (20, 24)), PipeSpec("gated", (4, 3), (5, 8), top_k=3, gate_scale=1.5)),
    "weighted",
)
PROFILE = Profile((1, 2, 4), (1, 8, 32))  # buckets 1, 8, 64, 128 tokens


def planted(table: dict[tuple[str, int], float]):
    """A timer that answers from ``table`` ((form, tokens) -> seconds; default 1 ms) and records its calls."""
    calls: list[tuple[str, int]] = []

    def timer(form: str, tokens: int, call) -> float:
        calls.append((form, tokens))
        return table.get((form, tokens), table.get((form, None), 1e-3))

    timer.calls = calls  # type: ignore[attr-defined]
    return timer


def _build(tmp_path: Path, timer, precisions=("fp32",)) -> tuple[Path, Path]:
    adapter = tmp_path / "tiny.safetensors"
    if not adapter.exists():
        random_adapter(TINY, seed=3).save(adapter)
    out = tmp_path / "e"
    build_engines(
        BuildRequest(
            adapter=adapter, out_dir=out, target="ort-cpu", precisions=precisions, profile=PROFILE, form_timer=timer
        ),
        log=lambda _m: None,
    ).raise_for_failures()
    return adapter, out


def test_token_buckets_cover_the_profile():
    assert token_buckets(PROFILE) == [(1, 1), (8, 8), (64, 64), (128, 128)]
    assert token_buckets(Profile((1, 4, 32), (1, 64, 1024))) == [(1, 1), (8, 8), (64, 64), (32768, 512)]
    assert token_buckets(Profile((2, 2, 2), (3, 3, 3))) == [(6, 6)]


def test_choose_form_takes_the_fastest_that_passed():
    assert (
        choose_form({"A": 2.0, "B": 1.0, "sparse": 0.5}, {"A": True, "B": True, "sparse": False}, CANDIDATE_FORMS)
        == "B"
    )
    assert (
        choose_form({"A": 1.0, "B": 1.0, "sparse": 3.0}, dict.fromkeys(CANDIDATE_FORMS, True), CANDIDATE_FORMS) == "A"
    )  # ties: the earlier candidate
    assert choose_form({"A": None}, {"A": False}, ["A"]) is None


@pytest.mark.parametrize("slow", CANDIDATE_FORMS)
def test_a_planted_slow_form_is_never_chosen(tmp_path, slow):
    timer = planted({(slow, None): 10.0})
    _, out = _build(tmp_path, timer)
    entry = read_manifest(out)["engines"][0]
    assert {t for _, t in timer.calls} == {1, 8, 64, 128}  # every bucket timed
    assert all(b["form"] != slow for b in entry["forms"]["buckets"])
    assert slow not in [p["form"] for p in entry["parts"]]
    # nothing but the chosen forms' files is left in the folder
    listed = {p["file"] for p in entry["parts"]}
    assert {f.name for f in out.iterdir() if f.suffix == ".onnx"} == listed


def test_choice_is_reproducible_from_recorded_timings_and_runtime_follows(tmp_path):
    # sparse fastest for one token, A for 8, B above
    table = {("sparse", 1): 1e-5, ("A", 8): 1e-5, ("B", 64): 1e-5, ("B", 128): 1e-5}
    adapter_path, out = _build(tmp_path, planted(table))
    manifest = read_manifest(out)
    entry = manifest["engines"][0]
    forms = entry["forms"]
    for bucket in forms["buckets"]:
        assert bucket["form"] == choose_form(bucket["seconds"], bucket["passed"], forms["candidates"])
    assert [b["form"] for b in forms["buckets"]] == ["sparse", "A", "B", "B"]
    assert [p["form"] for p in entry["parts"]] == ["sparse", "A", "B"]

    engines = load_engines(out, precision="fp32")
    ran: list[str] = []
    for form, runner in engines.by_form.items():
        real = runner.run
        runner.run = lambda x, form=form, real=real: (ran.append(form), real(x))[1]
    reference = load_adapter(adapter_path)
    for tokens, form in [(1, "sparse"), (5, "A"), (8, "A"), (9, "B"), (500, "B"), (0, "sparse")]:
        x = np.random.default_rng(tokens).standard_normal((1, tokens, 24)).astype(np.float32)
        y = engines.run(x)
        assert ran[-1] == form and engines.form_for(tokens) == form
        want = reference(torch.from_numpy(x).double()).numpy()
        assert y.shape == want.shape
        if tokens:
            assert np.linalg.norm(y - want) <= 1e-5 * np.linalg.norm(want)


def test_version_1_manifest_is_still_read_and_mismatched_forms_are_refused(tmp_path):
    _, out = _build(tmp_path, planted({("sparse", None): 1e-6}))
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = manifest["engines"][0]
    assert manifest["schema_version"] == 2 and [p["form"] for p in entry["parts"]] == ["sparse"]

    bad = json.loads(json.dumps(manifest))
    bad["engines"][0]["parts"][0]["form"] = "A"
    path.write_text(json.dumps(bad))
    with pytest.raises(EngineFileError, match="forms"):
        read_manifest(out)

    old = json.loads(json.dumps(manifest))  # what version 1 wrote: one graph, no forms
    old["schema_version"] = 1
    del old["engines"][0]["forms"]
    del old["engines"][0]["parts"][0]["form"]
    path.write_text(json.dumps(old))
    engines = load_engines(out, precision="fp32")
    assert engines.by_form == {} and engines.form_for(3) is None
    assert engines.run(np.zeros((2, 3, 24), np.float32)).shape == (2, 3, 20)


def test_forms_auto_builds_one_graph(tmp_path):
    adapter = tmp_path / "tiny.safetensors"
    random_adapter(TINY, seed=3).save(adapter)
    build_engines(
        BuildRequest(
            adapter=adapter,
            out_dir=tmp_path / "e",
            target="ort-cpu",
            precisions=("fp32",),
            profile=PROFILE,
            forms="auto",
        ),
        log=lambda _m: None,
    ).raise_for_failures()
    entry = read_manifest(tmp_path / "e")["engines"][0]
    assert entry.get("forms") is None and len(entry["parts"]) == 1


def test_the_lowering_rule_graph_is_a_candidate_and_kept_when_nothing_is_faster(tmp_path):
    """Two gated pipes whose rule picks A (tc <= tr) and B (tc > tr): "auto" (the graph builds
    made before forms were timed) is a candidate, the baseline, and wins every tie."""
    mixed = AdapterConfig(24, 20, (PipeSpec("a", (2, 3), (10, 8), top_k=2), PipeSpec("b", (4, 2), (5, 12), top_k=3)))
    adapter = tmp_path / "mixed.safetensors"
    random_adapter(mixed, seed=5).save(adapter)
    build_engines(
        BuildRequest(
            adapter=adapter,
            out_dir=tmp_path / "e",
            target="ort-cpu",
            precisions=("fp32",),
            profile=PROFILE,
            form_timer=planted({}),
        ),
        log=lambda _m: None,
    ).raise_for_failures()
    entry = read_manifest(tmp_path / "e")["engines"][0]
    assert entry["forms"]["baseline"] == "auto" and entry["forms"]["candidates"][0] == "auto"
    assert [b["form"] for b in entry["forms"]["buckets"]] == ["auto"] * 4
    assert [p["form"] for p in entry["parts"]] == ["auto"]


def test_inspect_shows_the_table_of_a_build_folder(tmp_path, capsys):
    from prism_deploy.cli.main import main

    _, out = _build(tmp_path, planted({("sparse", 1): 1e-5, ("A", None): 2e-3}))
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line[:1].isdigit()]
    assert [(r[0], r[-1]) for r in rows] == [("1-1", "sparse"), ("2-8", "B"), ("9-64", "B"), ("65-128", "B")]
    assert main(["inspect", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["engines"][0]["forms"] == read_manifest(out)["engines"][0]["forms"]
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "empty" in err[0]
