"""A built graph served as a Triton ensemble (docs/graphs.md): against a real Triton (the
nvidia-pytriton wheel's 2.51), one server start.

The graph has both fan-ins: A -> {a-b -> B, a-c -> C} -> fusion adapter ``fuse`` -> D1, and
A -> a-d2 -> D2, with D1 and D2 joined by a logit fusion ``mix`` (D1 and D2: one build of one
Qwen2 last model). The served ensemble ``graph`` and ``generate`` equal the in-process
``Graph`` of the same build folder; ``triton update`` hot-swaps one branch's adapter and the
served ensemble then equals the in-process graph with that adapter.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from prism_deploy.cli.main import main
from prism_deploy.format.graph_file import read_graph_file
from prism_deploy.reference import random_adapter, simple_config
from prism_deploy.runtime.graph import Graph
from tests.runtime.test_graph import diamond, ids_and_mask, parts, write  # noqa: F401 (parts: the fixture)
from tests.serving_helpers import http_input, rel_l2, running_server

httpclient = pytest.importorskip("tritonclient.http")


def both_fusions(p) -> list[dict]:
    stages = diamond(p)
    stages[-1] = {**stages[-1], "name": "D1"}
    return stages + [
        {"adapter": str(p["a-d2"]), "name": "a-d2", "inputs": ["A"]},
        {"model": str(p["D"]), "hf": str(p["hf"]["qwen2"]), "name": "D2"},
        {"fusion": "logits", "inputs": ["D1", "D2"], "weights": [0.7, 0.3], "name": "mix"},
    ]


def test_served_graph_equals_the_in_process_graph_and_hot_swaps_one_adapter(parts, serving_env, tmp_path, capsys):  # noqa: F811
    built = tmp_path / "built"
    assert (
        main(
            [
                "build",
                "--graph",
                str(write(tmp_path / "graph.json", both_fusions(parts))),
                "-o",
                str(built),
                "--target",
                "ort-cpu",
                "--json",
            ]
        )
        == 0
    )
    repo = tmp_path / "repo"
    capsys.readouterr()
    # the native form is refused in one line, before anything is written
    assert main(["triton", str(built), "-o", str(repo), "--backend", "native"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "python form only" in err[0] and not repo.exists()
    assert main(["triton", str(built), "-o", str(repo), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert {
        "A",
        "a-b",
        "B",
        "a-c",
        "C",
        "fuse_concat",
        "fuse",
        "D1",
        "a-d2",
        "D2",
        "mix",
        "D1_decode",
        "D2_decode",
        "graph",
        "generate",
    } == set(manifest["models"])
    steps = (repo / "graph" / "config.pbtxt").read_text()
    assert steps.count("step {") == 11  # one per stage, and the fusion adapter's concatenation

    graph = Graph.from_file(read_graph_file(built / "graph.json"))
    ids, mask = ids_and_mask()
    want = graph(ids, mask)
    want_tokens = graph.generate(ids, mask, max_new_tokens=4)
    a_c = next(n.index for n in graph.nodes if n.name == "a-c")
    new_adapter = tmp_path / "a-c-new.safetensors"
    random_adapter(simple_config(64, 96, (4, 2), top_k=3), seed=99).save(new_adapter)
    swapped = Graph.from_file(read_graph_file(built / "graph.json"), adapters={a_c: new_adapter})(ids, mask)
    assert rel_l2(swapped, want) > 1e-3  # the new adapter changes the output

    feeds = [http_input("input_ids", ids, "INT64"), http_input("attention_mask", mask, "INT64")]
    with running_server(repo, serving_env, tmp_path / "server.log") as server:
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
        try:
            got = client.infer("graph", feeds).as_numpy("logits")
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
            tokens = client.infer(
                "generate", [*feeds, http_input("max_new_tokens", np.array([4], np.int32), "INT32")]
            ).as_numpy("tokens")
            np.testing.assert_array_equal(tokens, want_tokens)
            assert (
                main(
                    [
                        "triton",
                        "update",
                        str(repo),
                        "--adapter",
                        str(new_adapter),
                        "--model",
                        "a-c",
                        "--url",
                        server.http_url,
                        "--json",
                    ]
                )
                == 0
            )
            report = json.loads(capsys.readouterr().out)
            assert report["model"] == "a-c" and report["version"] == 2 and report["server"]["old_unloaded"]
            after = client.infer("graph", feeds).as_numpy("logits")
            np.testing.assert_allclose(after, swapped, atol=1e-4, rtol=1e-4)
        finally:
            client.close()  # an open keep-alive connection would hold the server's shutdown


def test_a_graph_triton_cannot_serve_is_refused_in_one_line(parts, tmp_path, capsys):  # noqa: F811
    """An adapter given as a .safetensors (not built) names its stage; a graph among other folders
    is refused; nothing is written either time."""
    src = write(tmp_path / "graph.json", diamond(parts))
    repo = tmp_path / "repo"
    for argv, says in (([str(src)], "stage 2 (adapter a-b)"), ([str(src), str(parts["A"])], "served on its own")):
        capsys.readouterr()
        assert main(["triton", *argv, "-o", str(repo)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
        assert not repo.exists()
