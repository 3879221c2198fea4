"""``prism-deploy build --model DIR``: engines of the exported models, a manifest, the cache,
parity, and the pipeline running from the built folders (CPU, tiny local models)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from prism_deploy.cli.main import main
from prism_deploy.core.fsutil import file_sha256


@pytest.fixture(scope="module")
def exports(zoo):
    """The shared exports (tests/conftest.py): model A, model B, their HF folders, an adapter."""
    return zoo


@pytest.fixture(scope="module")
def built(exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    out = {"A": root / "A", "B": root / "B"}
    for key in ("A", "B"):
        assert main(["build", "--model", str(exports[key]), "-o", str(out[key]), "--target", "ort-cpu", "--json"]) == 0
    return out


def _build(capsys, *argv: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    code = main(["build", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in argv and code == 0 else None), err


def test_first_and_last_builds_write_engines_manifest_and_copies(exports, built):
    for key, role, graphs in (("A", "first", ["graph"]), ("B", "last", ["graph", "graph_with_past"])):
        manifest = json.loads((built[key] / "manifest.json").read_text())
        assert manifest["schema"] == "prism-deploy.engines" and manifest["model"]["role"] == role
        assert manifest["model"]["model_json_sha256"] == file_sha256(exports[key] / "model.json")
        assert [e["configuration"]["graph"] for e in manifest["engines"]] == graphs
        for entry in manifest["engines"]:
            assert entry["target"] == "ort-cpu" and entry["parity"]["passed"]
            assert entry["parity"]["rel_l2"] < 1e-5
            part = entry["parts"][0]
            assert file_sha256(built[key] / part["file"]) == part["sha256"]
            # ONNX Runtime's offline optimization ran: RMSNorm became its fused contrib op
            ops = {n.op_type for n in onnx.load(str(built[key] / part["file"])).graph.node}
            assert "SimplifiedLayerNormalization" in ops
        copies = {c["file"] for c in manifest["model"]["copies"]}
        assert copies == ({"model.json"} if role == "first" else {"model.json", "embed_tokens.npy"})
        for name in copies:
            assert (built[key] / name).read_bytes() == (exports[key] / name).read_bytes()


def test_second_run_reuses_and_changed_model_rebuilds(exports, tmp_path, capsys):
    src = tmp_path / "A"
    shutil.copytree(exports["A"], src)
    out = tmp_path / "out"
    code, first, _ = _build(capsys, "--model", str(src), "-o", str(out), "--target", "ort-cpu", "--json")
    assert code == 0 and [e["action"] for e in first["engines"]] == ["built"] and first["manifest_written"]
    manifest_bytes = (out / "manifest.json").read_bytes()
    code, second, _ = _build(capsys, "--model", str(src), "-o", str(out), "--target", "ort-cpu", "--json")
    assert code == 0 and [e["action"] for e in second["engines"]] == ["reused"] and not second["manifest_written"]
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    # a re-export with other weights (same shapes): new graph hash, recorded in model.json
    model = onnx.load(str(src / "first.onnx"))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(model, str(src / "first.onnx"))
    meta = json.loads((src / "model.json").read_text())
    meta["files"]["graph"]["sha256"] = file_sha256(src / "first.onnx")
    (src / "model.json").write_text(json.dumps(meta))
    old_file = first["engines"][0]["entry"]["parts"][0]["file"]
    code, third, _ = _build(capsys, "--model", str(src), "-o", str(out), "--target", "ort-cpu", "--json")
    assert code == 0 and [e["action"] for e in third["engines"]] == ["built"]
    new_file = third["engines"][0]["entry"]["parts"][0]["file"]
    assert new_file != old_file and not (out / old_file).exists()  # superseded engine collected
    assert json.loads((out / "model.json").read_text()) == meta


def test_changed_tool_version_rebuilds(exports, tmp_path, capsys, monkeypatch):
    from prism_deploy.core import targets as environment

    out = tmp_path / "out"
    assert _build(capsys, "--model", str(exports["A"]), "-o", str(out), "--target", "ort-cpu")[0] == 0
    real = environment.tool_versions
    monkeypatch.setattr(environment, "tool_versions", lambda target: {**real(target), "onnxruntime": "99.0"})
    code, result, _ = _build(capsys, "--model", str(exports["A"]), "-o", str(out), "--target", "ort-cpu", "--json")
    assert code == 0 and [e["action"] for e in result["engines"]] == ["built"]


def test_corrupt_engine_is_refused_by_the_pipeline_and_rebuilt(exports, tmp_path, capsys):
    from prism_deploy.format.engine_manifest import EngineFileError
    from prism_deploy.runtime.chain import Pipeline

    out = tmp_path / "A"
    assert _build(capsys, "--model", str(exports["A"]), "-o", str(out), "--target", "ort-cpu")[0] == 0
    part = json.loads((out / "manifest.json").read_text())["engines"][0]["parts"][0]
    engine = out / part["file"]
    data = bytearray(engine.read_bytes())
    data[-10] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(EngineFileError, match="does not match the manifest"):
        Pipeline(out, exports["adapter"], exports["B"], target="ort-cpu")
    code, result, _ = _build(capsys, "--model", str(exports["A"]), "-o", str(out), "--target", "ort-cpu", "--json")
    assert code == 0 and [e["action"] for e in result["engines"]] == ["built"]
    assert (
        file_sha256(out / result["engines"][0]["entry"]["parts"][0]["file"])
        == result["engines"][0]["entry"]["parts"][0]["sha256"]
    )


def test_failed_parity_exits_1_and_keeps_the_manifest(exports, tmp_path, capsys, monkeypatch):
    from prism_deploy.builder import loop

    out = tmp_path / "B"
    assert _build(capsys, "--model", str(exports["B"]), "-o", str(out), "--target", "ort-cpu")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real = loop.build_part

    def sabotaged(backend, onnx_path, work, stem, request):  # an engine of other weights: parity must see it
        model = onnx.load(str(onnx_path))
        init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0.5, init.name))
        bad = work / f"{stem}.bad.onnx"
        onnx.save(model, str(bad))
        return real(backend, bad, work, stem, request)

    monkeypatch.setattr("prism_deploy.builder.model_source.build_part", sabotaged)
    code, _, err = _build(capsys, "--model", str(exports["B"]), "-o", str(out), "--target", "ort-cpu", "--force")
    assert code == 1 and "parity failed" in err and "rel_l2" in err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before


def test_pipeline_from_built_folders_equals_pipeline_from_exports(exports, built):
    from prism_deploy.runtime.chain import Pipeline

    plain = Pipeline(exports["A"], exports["adapter"], exports["B"], target="ort-cpu")
    engines = Pipeline(built["A"], exports["adapter"], built["B"], target="ort-cpu")
    assert engines.first.folder.built and engines.last.folder.built and not plain.first.folder.built
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 300, size=(3, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[-1, :3] = 0
    want, got = plain(ids, mask), engines(ids, mask)
    assert got.shape == (3, 9, 320)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        engines.generate(ids, mask, max_new_tokens=6), plain.generate(ids, mask, max_new_tokens=6)
    )


def test_run_cli_accepts_built_folders(exports, built, capsys):
    capsys.readouterr()
    ids = exports["A"].parent / "ids.json"
    ids.write_text(json.dumps([[5, 17, 42, 7]]))
    argv = ["run", "--adapter", str(exports["adapter"]), "--ids", str(ids), "--max-new-tokens", "3", "--json"]
    assert main([*argv, "--model-a", str(built["A"]), "--model-b", str(built["B"])]) == 0
    from_built = json.loads(capsys.readouterr().out)
    assert main([*argv, "--model-a", str(exports["A"]), "--model-b", str(exports["B"])]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert (
        from_built["generated_ids"] == from_export["generated_ids"]
        and from_built["next_token"] == from_export["next_token"]
    )


def test_built_folder_of_the_wrong_role_is_refused(exports, built):
    from prism_deploy.core.errors import PrismInputError
    from prism_deploy.runtime.chain import Pipeline

    with pytest.raises(PrismInputError, match="role 'last', 'first' is needed"):
        Pipeline(built["B"], exports["adapter"], built["B"], target="ort-cpu")
    with pytest.raises(PrismInputError, match="a model folder .*where an adapter belongs"):
        Pipeline(exports["A"], built["A"], exports["B"], target="ort-cpu")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "{empty}"], "no model.json"),
        (["{adapter}", "--model", "{A}"], "not both"),
        ([], "give ADAPTER"),
        (["--model", "{A}", "--precision", "fp16"], "--precision"),
        (["--model", "{missing}"], "not a folder"),
        (["--model", "{built}"], "already a build folder"),
    ],
)
def test_bad_input_exits_2_with_one_error_line(exports, built, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    names = {
        "empty": tmp_path / "empty",
        "adapter": exports["adapter"],
        "A": exports["A"],
        "missing": tmp_path / "nope",
        "built": built["A"],
    }
    capsys.readouterr()
    code = main(["build", *(a.format(**names) for a in argv), "-o", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_default_output_is_role_and_model_json_hash(exports, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, result, _ = _build(capsys, "--model", str(exports["B"]), "--target", "ort-cpu", "--json")
    expected = Path("engines") / f"last-{file_sha256(exports['B'] / 'model.json')[:8]}"
    assert code == 0 and Path(result["directory"]) == expected and (tmp_path / expected / "manifest.json").is_file()


def test_end_to_end_parity_from_built_folders(exports, built, capsys):
    capsys.readouterr()
    assert (
        main(
            [
                "parity-pipeline",
                "--model-a-hf",
                str(exports["llama"]),
                "--model-a",
                str(built["A"]),
                "--model-b-hf",
                str(exports["qwen2"]),
                "--model-b",
                str(built["B"]),
                "--adapter",
                str(exports["adapter"]),
                "--batch",
                "2",
                "--seq",
                "6",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["logits"]["kl_max"] < 1e-8


def test_changed_embedding_copy_is_refused_and_restored_by_a_rebuild(exports, built, tmp_path, capsys):
    from prism_deploy.format.engine_manifest import EngineFileError
    from prism_deploy.runtime.chain import Pipeline

    out = tmp_path / "B"
    shutil.copytree(built["B"], out)
    table = np.load(out / "embed_tokens.npy")
    np.save(out / "embed_tokens.npy", table * 2)
    with pytest.raises(EngineFileError, match="embed_tokens.npy: sha256"):
        Pipeline(exports["A"], exports["adapter"], out, target="ort-cpu")
    code, result, _ = _build(capsys, "--model", str(exports["B"]), "-o", str(out), "--target", "ort-cpu", "--json")
    assert code == 0 and [e["action"] for e in result["engines"]] == ["reused", "reused"] and result["manifest_written"]
    np.testing.assert_array_equal(np.load(out / "embed_tokens.npy"), table)
    Pipeline(exports["A"], exports["adapter"], out, target="ort-cpu")
