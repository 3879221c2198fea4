"""The ``ort`` graph form served (docs/model-forms.md, docs/serving.md): a chain of ort-form
``first`` and ``last`` models (the tiny random Llama, exported with ``--graph-form ort``) and an
adapter, written as a Triton repository and run by a real server, answers as the in-process
chain does. Its ``generate`` models decode in their own process on the shared KV buffer (no
``last_decode``); the native form refuses the ort form. Skipped, with the reason, where
``onnxruntime_genai`` is not installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from prism_deploy.cli.main import main
from tests.serving_helpers import http_input, rel_l2, running_server

httpclient = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def ort_chain(zoo, tmp_path_factory):
    """ort-form first and last of the tiny Llama (head size 16), and a 64 -> 64 adapter built for ort-cpu."""
    from prism_deploy.models.ort_form_builder import builder_missing

    why = builder_missing()
    if why:
        pytest.skip(why)
    from prism_deploy.builder import BuildRequest, build_engines
    from prism_deploy.models.ort_form_builder import export_ort_form
    from prism_deploy.reference import random_adapter, simple_config

    root = tmp_path_factory.mktemp("ort_chain")
    export_ort_form(zoo["llama"], "first", root / "first", max_seq=32)
    export_ort_form(zoo["llama"], "last", root / "last", max_seq=32)
    random_adapter(simple_config(64, 64, (4, 2)), seed=3).save(root / "a.safetensors")
    build_engines(
        BuildRequest(adapter=root / "a.safetensors", out_dir=root / "a", target="ort-cpu", precisions=("fp32",)),
        log=lambda _m: None,
    ).raise_for_failures()
    return [root / "first", root / "a", root / "last"]


def _generate_inputs(ids, mask, n):
    return [
        http_input("input_ids", ids, "INT64"),
        http_input("attention_mask", mask, "INT64"),
        http_input("max_new_tokens", np.array([n], np.int32), "INT32"),
        http_input("eos_token_id", np.array([-1], np.int64), "INT64"),
    ]


def test_repository_of_an_ort_chain_decodes_in_process(ort_chain, tmp_path):
    repo = tmp_path / "repo"
    assert main(["triton", *map(str, ort_chain), "-o", str(repo), "--stream"]) == 0
    manifest = json.loads((repo / "prism-repository.json").read_text())
    assert set(manifest["models"]) == {"first", "adapter", "last", "chain", "generate", "generate_stream"}
    assert manifest["models"]["last"]["graph_form"] == "ort"
    for name in ("generate", "generate_stream"):  # each carries the last stage it decodes on
        assert (repo / name / "1" / "stage" / "model.json").is_file()
        assert 'key: "decode_in_process"' in (repo / name / "config.pbtxt").read_text()


def test_a_built_ort_last_is_served_from_its_engine(ort_chain, tmp_path):
    """A `build --model` folder of the ort form as the last stage: generate's stage folder holds
    the built engine and its manifest, and opens on the runtime as the export does."""
    from prism_deploy.runtime.model_stage import ModelStage

    built = tmp_path / "last_build"
    assert main(["build", "--model", str(ort_chain[2]), "--target", "ort-cpu", "-o", str(built)]) == 0
    repo = tmp_path / "repo"
    assert main(["triton", str(ort_chain[0]), str(ort_chain[1]), str(built), "-o", str(repo)]) == 0
    served = repo / "generate" / "1" / "stage"
    assert (served / "manifest.json").is_file() and list(served.glob("*.ort.onnx"))
    stage, export = ModelStage(served), ModelStage(ort_chain[2])
    assert stage.folder.built and stage.graph_form == "ort"
    x = np.random.default_rng(1).normal(0, 0.05, (1, 5, 64)).astype(np.float32)
    mask = np.ones((1, 5), dtype=np.int64)
    got = stage.step(x, mask, stage.empty_past(1))[0]
    np.testing.assert_allclose(got, export.step(x, mask, export.empty_past(1))[0], rtol=1e-5, atol=1e-5)


def test_native_form_refuses_the_ort_form(ort_chain, tmp_path, capsys):
    assert main(["triton", *map(str, ort_chain), "-o", str(tmp_path / "repo"), "--backend", "native"]) == 2
    err = capsys.readouterr().err
    assert "ort graph form is served by the Python backend only" in err and str(ort_chain[0]) in err
    assert not (tmp_path / "repo").exists()


def test_served_ort_chain_answers_as_the_runtime_chain(ort_chain, serving_env, tmp_path):
    from prism_deploy.runtime.chain import Chain

    repo = tmp_path / "repo"
    assert main(["triton", *map(str, ort_chain), "-o", str(repo), "--stream"]) == 0
    chain = Chain(ort_chain, target="ort-cpu")
    ids = np.random.default_rng(8).integers(0, 300, size=(2, 6), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row: the ort runner rolls it for GroupQueryAttention
    ref_logits, ref_tokens = chain(ids, mask), chain.generate(ids, mask, max_new_tokens=8)
    with running_server(repo, serving_env, tmp_path / "server.log") as server:
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
        logits = client.infer(
            "chain", [http_input("input_ids", ids, "INT64"), http_input("attention_mask", mask, "INT64")]
        ).as_numpy("logits")
        tokens = client.infer("generate", _generate_inputs(ids, mask, 8)).as_numpy("tokens")
        # a second generation in the same model: a fresh cache, the same tokens
        again = client.infer("generate", _generate_inputs(ids, mask, 8)).as_numpy("tokens")
        client.close()
    real = mask.astype(bool)
    assert rel_l2(logits[real], ref_logits[real]) <= 1e-5
    assert tokens.shape == (2, 8)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(again, ref_tokens)
