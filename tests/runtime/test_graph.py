"""Graphs of models (docs/graphs.md): the graph file and its checks, a diamond A -> {B, C} ->
fusion adapter -> D and a two-branch logit fusion against the PyTorch reference (end to end and
edge by edge), bisection of a planted fault to its edge, chain files run as graphs unchanged,
and bad graphs refused in one line before anything runs.

Tiny random local models (tests/model_helpers.py): A = Llama (64, first), B = GPT-2 (48, middle),
C = Qwen2 (96, middle), D = Qwen2 (96, last); random gated adapters. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prism_deploy.cli.main import main
from prism_deploy.core.errors import PrismInputError
from prism_deploy.format.graph_file import read_graph_file
from prism_deploy.parity.graph_parity import ReferenceGraph, check_graph_parity
from prism_deploy.reference import load_adapter, random_adapter, simple_config
from prism_deploy.runtime.chain import Chain
from prism_deploy.runtime.graph import Graph, log_softmax


@pytest.fixture(scope="module")
def parts(zoo, tmp_path_factory):
    from prism_deploy.models.lm_export import export_model

    root = tmp_path_factory.mktemp("graph")
    p: dict = {"hf": zoo, "A": zoo["A"], "D": zoo["B"], "root": root}
    for name, kind, role in (("B", "gpt2", "middle"), ("C", "qwen2", "middle"), ("G", "gpt2", "last")):
        p[name] = root / name
        export_model(zoo[kind], role, p[name], max_seq=32)
    for name, d_in, d_out, seed in (
        ("a-b", 64, 48, 21),
        ("a-c", 64, 96, 22),
        ("fuse", 48 + 96, 96, 23),
        ("a-d1", 64, 96, 24),
        ("a-d2", 64, 96, 25),
        ("a-g", 64, 48, 26),
    ):
        p[name] = root / f"{name}.safetensors"
        random_adapter(simple_config(d_in, d_out, (4, 2), top_k=3), seed=seed).save(p[name])
    return p


def diamond(p) -> list[dict]:
    hfz = p["hf"]
    return [
        {"model": str(p["A"]), "hf": str(hfz["llama"]), "name": "A"},
        {"adapter": str(p["a-b"]), "name": "a-b"},
        {"model": str(p["B"]), "hf": str(hfz["gpt2"]), "name": "B"},
        {"adapter": str(p["a-c"]), "name": "a-c", "inputs": ["A"]},
        {"model": str(p["C"]), "hf": str(hfz["qwen2"]), "name": "C"},
        {"adapter": str(p["fuse"]), "name": "fuse", "inputs": ["B", "C"]},
        {"model": str(p["D"]), "hf": str(hfz["qwen2"]), "name": "D"},
    ]


def logit_fusion(p) -> list[dict]:
    hfz = p["hf"]
    return [
        {"model": str(p["A"]), "hf": str(hfz["llama"]), "name": "A"},
        {"adapter": str(p["a-d1"]), "name": "a-d1"},
        {"model": str(p["D"]), "hf": str(hfz["qwen2"]), "name": "D1"},
        {"adapter": str(p["a-d2"]), "name": "a-d2", "inputs": ["A"]},
        {"model": str(p["D"]), "hf": str(hfz["qwen2"]), "name": "D2"},
        {"fusion": "logits", "inputs": ["D1", "D2"], "weights": [0.7, 0.3], "name": "mix"},
    ]


def write(path: Path, stages: list[dict], **top) -> Path:
    path.write_text(json.dumps({**top, "stages": stages}))
    return path


def ids_and_mask(vocab: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(2, 7), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[-1, :2] = 0  # one left-padded row
    return ids, mask


@pytest.fixture(scope="module")
def opened(parts, tmp_path_factory):
    """The diamond and the logit fusion, opened once, with their references."""
    root = tmp_path_factory.mktemp("graphs")
    out = {}
    for name, stages in (("diamond", diamond(parts)), ("logits", logit_fusion(parts))):
        spec = read_graph_file(write(root / f"{name}.json", stages))
        out[name] = (Graph.from_file(spec), ReferenceGraph(spec))
    return out


@pytest.mark.parametrize("which", ["diamond", "logits"])
def test_graph_equals_the_reference_end_to_end_and_edge_by_edge(opened, which):
    graph, reference = opened[which]
    ids, mask = ids_and_mask()
    report = check_graph_parity(graph, reference, ids, mask, new_tokens=3)
    assert report["passed"], report["failures"]
    assert [h["name"] for h in report["stages"]] == [graph.names[i] for i in graph.spec.order]
    assert all(h["passed"] for h in report["stages"])
    assert report["greedy"]["match"] == 1.0
    edges = {h["name"]: h["edge"] for h in report["stages"]}
    if which == "diamond":
        assert edges["fuse"] == "B + C -> fuse" and edges["a-c"] == "A -> a-c"
        assert graph.describe()["waves"] == [["A"], ["a-b", "a-c"], ["B", "C"], ["fuse"], ["D"]]
    else:
        assert edges["mix"] == "D1 + D2 -> mix"


def test_the_diamond_is_its_parts_by_hand(opened, parts):
    """Independently of ReferenceGraph: the fusion adapter sees B's and C's hidden states side
    by side, and D sees its output; concurrent and one-at-a-time runs agree."""
    graph, _ = opened["diamond"]
    ids, mask = ids_and_mask()
    outs, _ = graph.stage_outputs(ids, mask)
    fuse = load_adapter(parts["fuse"])
    import torch

    with torch.no_grad():
        want = fuse(torch.from_numpy(np.concatenate([outs[2], outs[4]], -1))).numpy()
    assert np.allclose(outs[5], want, atol=1e-5)
    logits = graph(ids, mask)
    assert np.array_equal(logits, outs[6])
    graph.concurrent = False
    try:
        assert np.allclose(graph(ids, mask), logits, atol=1e-6)
    finally:
        graph.concurrent = True


def test_logit_fusion_is_the_weighted_branches(opened, parts):
    """The fused output is 0.7 log p(D1) + 0.3 log p(D2), each branch run as its own chain; and
    greedy generation picks from it."""
    graph, _ = opened["logits"]
    ids, mask = ids_and_mask()
    branches = [Chain([parts["A"], parts[a], parts["D"]])(ids, mask) for a in ("a-d1", "a-d2")]
    want = 0.7 * log_softmax(branches[0]) + 0.3 * log_softmax(branches[1])
    got = graph(ids, mask)
    assert np.allclose(got, want, atol=1e-4)
    assert not np.array_equal(branches[0].argmax(-1), branches[1].argmax(-1))  # the branches differ
    assert graph.stages[2] is graph.stages[4]  # D1 and D2 name one folder: opened once
    tokens = graph.generate(ids, mask, max_new_tokens=1)
    assert np.array_equal(tokens[:, 0], want[:, -1].argmax(-1))


def scaled_worker_adapter(src: Path, dst: Path, pipe: int, worker: int, factor: float) -> None:
    adapter = load_adapter(src)
    tensors = {k: v.clone() for k, v in adapter.tensors().items()}
    tensors[f"pipes.{pipe}.tiles"][worker] *= factor
    type(adapter)(adapter.config, tensors).save(dst)


@pytest.mark.parametrize(("index", "edge"), [(5, "B + C -> fuse"), (3, "A -> a-c")], ids=["fusion", "branch"])
def test_bisect_names_the_edge_pipe_and_worker(parts, tmp_path, capsys, index, edge):
    """A worker scaled in the fusion adapter, or in one branch's adapter: the failing stage is
    that one, named with its edge; the stages after it pass on the reference's inputs."""
    name = diamond(parts)[index]["name"]
    bad = tmp_path / f"{name}-bad.safetensors"
    scaled_worker_adapter(parts[name], bad, pipe=0, worker=5, factor=4.0)
    stages = diamond(parts)
    stages[index].update(adapter=str(bad), reference=str(parts[name]))
    path = write(tmp_path / "graph.json", stages)
    capsys.readouterr()
    code = main(["parity", "--graph", str(path), "--json", "--seq", "8"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert code == 1 and err.count("\n") == 1
    found = report["bisect"]
    assert found["found"] == index + 1 and found["edge"] == edge and found["name"] == name
    assert found["pipe"]["index"] == 0 and found["workers"][0]["worker"] == 5
    by_name = {h["name"]: h["passed"] for h in report["stages"]}
    assert by_name == {s["name"]: s["name"] != name for s in stages}
    assert f"bisect: stage {index + 1} (adapter {name}) on edge {edge}, pipe 0" in err


def test_chain_files_run_as_graphs_unchanged(parts, tmp_path, capsys):
    hfz = parts["hf"]
    stages = [
        {"model": str(parts["A"]), "hf": str(hfz["llama"])},
        {"adapter": str(parts["a-d1"])},
        {"model": str(parts["D"]), "hf": str(hfz["qwen2"])},
    ]
    path = write(tmp_path / "chain.json", stages)
    ids, mask = ids_and_mask()
    spec = read_graph_file(path)
    assert spec.is_chain()
    assert np.array_equal(Graph.from_file(spec)(ids, mask), Chain.from_file(path)(ids, mask))
    ids_file = tmp_path / "ids.json"
    ids_file.write_text("[[1, 2, 3, 4]]")
    for flag in ("--chain", "--graph"):
        capsys.readouterr()
        assert main(["run", flag, str(path), "--ids", str(ids_file), "--max-new-tokens", "3", "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)["generated_ids"][0]) == 3
    # a graph file given as a chain says to use --graph
    assert main(["run", "--chain", str(write(tmp_path / "g.json", diamond(parts))), "--ids", str(ids_file)]) == 2
    assert "a graph file, not a chain file; give it with --graph" in capsys.readouterr().err


def bad_graphs(p) -> list[tuple[str, list[dict], str]]:
    cycle = diamond(p)
    cycle[2]["inputs"] = ["a-b"]
    cycle[1]["inputs"] = ["D"]  # D -> a-b -> B -> fuse -> D
    two_sources = diamond(p)
    two_sources[3]["inputs"] = []
    width = diamond(p)
    width[5]["adapter"] = str(p["a-c"])  # in_dim 64 where B + C = 48 + 96 = 144 belongs
    unreachable = diamond(p)
    unreachable[6]["inputs"] = ["fuse"]
    unreachable.insert(6, {"adapter": str(p["a-g"]), "name": "dangling", "inputs": ["A"]})
    tokenizers = logit_fusion(p)
    tokenizers[3]["adapter"] = str(p["a-g"])
    tokenizers[4] = {"model": str(p["G"]), "hf": str(p["hf"]["gpt2"]), "name": "G"}
    tokenizers[5]["inputs"] = ["D1", "G"]
    role = diamond(p)
    role[6]["model"] = str(p["C"])  # a middle export where the output needs a last model
    adapter_to_adapter = diamond(p)
    adapter_to_adapter[3]["inputs"] = ["a-b"]
    return [
        ("role", role, "stage 7 (model D): exported as role 'middle'; its place in the graph needs a 'last' model"),
        (
            "adapter to adapter",
            adapter_to_adapter,
            "stage 4 (adapter a-c): edge a-b -> a-c: an adapter takes models' hidden states",
        ),
        ("cycle", cycle, "a cycle through the edges"),
        ("two sources", two_sources, "stage 1 (model A) and stage 4 (adapter a-c) both take no input"),
        (
            "width",
            width,
            "stage 6 (adapter fuse): edge B + C -> fuse: in_dim 64 does not match the hidden widths 48 + 96 = 144",
        ),
        ("unreachable", unreachable, "stage 7 (adapter dangling): unreachable from the output"),
        ("tokenizers", tokenizers, "stage 6 (fusion mix): edge D1 + G -> mix: G's tokenizer"),
    ]


def test_bad_graphs_are_refused_in_one_line_before_anything_runs(parts, tmp_path, capsys, monkeypatch):
    ids_file = tmp_path / "ids.json"
    ids_file.write_text("[[1, 2, 3]]")
    import prism_deploy.runtime.graph as runtime_graph

    def no_open(*args, **kwargs):
        raise AssertionError("a stage was opened")

    monkeypatch.setattr(runtime_graph, "ModelStage", no_open)
    monkeypatch.setattr(runtime_graph, "adapter_runner", no_open)
    for name, stages, message in bad_graphs(parts):
        path = write(tmp_path / f"{name.replace(' ', '-')}.json", stages)
        with pytest.raises(PrismInputError):
            read_graph_file(path)
        capsys.readouterr()
        code = main(["run", "--graph", str(path), "--ids", str(ids_file)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (name, err)
        assert str(path) in err[0]


def test_collect_and_fit_per_edge_including_the_fusion(parts, tmp_path, capsys):
    """collect --graph --edge: a plain edge pairs as collect --hop does; the fusion edge's X is
    B's and C's hidden states side by side (48 + 96), aligned by characters; fit makes an
    adapter of in_dim 144 that the diamond runs with, matching its reference."""
    from prism_deploy.models.collect import collect_pairs
    from tests.model_helpers import SENTENCES

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES))
    graph = write(tmp_path / "graph.json", diamond(parts))
    for edge in ("a-b", "fuse"):
        capsys.readouterr()
        assert (
            main(
                [
                    "collect",
                    "--graph",
                    str(graph),
                    "--edge",
                    edge,
                    "--text",
                    str(texts),
                    "-o",
                    str(tmp_path / f"{edge}.safetensors"),
                    "--pool",
                    "tokens",
                    "--json",
                ]
            )
            == 0
        )
        info = json.loads(capsys.readouterr().out)
        assert (info["d_a"], info["d_b"]) == {"a-b": (64, 48), "fuse": (144, 96)}[edge]
    from safetensors.numpy import load_file

    plain = load_file(str(tmp_path / "a-b.safetensors"))
    hfz = parts["hf"]
    x, z, _ = collect_pairs(hfz["llama"], hfz["gpt2"], SENTENCES, pool="tokens", progress=False)
    assert np.array_equal(plain["X"], x) and np.array_equal(plain["Z"], z)
    fused = load_file(str(tmp_path / "fuse.safetensors"))
    xb, _, _ = collect_pairs(hfz["gpt2"], hfz["qwen2"], SENTENCES, pool="tokens", progress=False)
    assert fused["X"].shape[1] == 144 and fused["X"].shape[0] == xb.shape[0]  # one row per B token
    assert np.allclose(fused["X"][:, :48], xb)  # B's side is B's own collect
    fitted = tmp_path / "fuse-fit.safetensors"
    assert (
        main(
            [
                "fit",
                "--x",
                f"{tmp_path / 'fuse.safetensors'}:X",
                "--z",
                f"{tmp_path / 'fuse.safetensors'}:Z",
                "-o",
                str(fitted),
                "--grid",
                "2",
                "2",
                "--ridge",
                "1e-3",
                "--json",
            ]
        )
        == 0
    )
    assert load_adapter(fitted).config.in_dim == 144
    stages = diamond(parts)
    stages[5]["adapter"] = str(fitted)
    spec = read_graph_file(write(tmp_path / "fitted.json", stages))
    ids, mask = ids_and_mask()
    assert check_graph_parity(Graph.from_file(spec), ReferenceGraph(spec), ids, mask)["passed"]


def test_build_graph_builds_each_source_once_and_runs_as_the_graph(opened, parts, tmp_path, capsys):
    """build --graph: the logit fusion's two branches share one last model, built once; the
    built graph runs equal to the graph of sources; triton writes it as an ensemble."""
    stages = logit_fusion(parts)
    src = write(tmp_path / "graph.json", stages)
    out = tmp_path / "built"
    capsys.readouterr()
    assert main(["build", "--graph", str(src), "-o", str(out), "--target", "ort-cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    built = json.loads((out / "graph.json").read_text())
    assert report["graph_file"] == str(out / "graph.json")
    assert len(report["stages"]) == 4 and {e["action"] for s in report["stages"] for e in s["engines"]} == {"built"}
    assert built["stages"][2]["model"] == built["stages"][4]["model"]  # D1 and D2: one build of D
    assert sorted(p.name for p in out.iterdir()) == ["1-A", "2-a-d1", "3-D1", "4-a-d2", "graph.json"]
    assert built["stages"][5] == {"fusion": "logits", "weights": [0.7, 0.3], "name": "mix", "inputs": ["D1", "D2"]}
    ids, mask = ids_and_mask()
    graph, _ = opened["logits"]
    assert np.allclose(Graph.from_file(read_graph_file(out / "graph.json"))(ids, mask), graph(ids, mask), atol=1e-5)
    # the deploy path needs no PyTorch: the built graph generates the same tokens without it
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(ids[:1].tolist()))
    capsys.readouterr()
    assert main(["run", "--graph", str(out), "--ids", str(ids_file), "--max-new-tokens", "3", "--json"]) == 0
    want = json.loads(capsys.readouterr().out)["generated_ids"]
    block = "import sys\nfor _name in ('torch', 'transformers'):\n    sys.modules[_name] = None\n"
    code = (
        block + "from prism_deploy.cli.main import main\n"
        f"sys.exit(main(['run', '--graph', {str(out)!r}, '--ids', {str(ids_file)!r}, '--max-new-tokens', '3', "
        "'--json']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["generated_ids"] == want
    # a second build reuses every stage
    assert main(["build", "--graph", str(src), "-o", str(out), "--target", "ort-cpu", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert {e["action"] for s in again["stages"] for e in s["engines"]} == {"reused"}
    # served as a Triton ensemble (tests/serving/test_graph.py runs it): the repository is written
    assert main(["triton", str(out), "-o", str(tmp_path / "repo"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["graph"]["ensemble"] == "graph"


@pytest.mark.slow  # the whole corpus (1,084 texts): 3 min on the loaded 2-core machine
def test_collect_per_edge_defaults_to_the_real_text_corpus(parts, tmp_path, capsys):
    """collect --graph --edge without --text reads the default corpus, as collect of two models does."""
    from prism_deploy.core import corpus

    graph = write(tmp_path / "graph.json", diamond(parts))
    capsys.readouterr()
    assert (
        main(
            [
                "collect",
                "--graph",
                str(graph),
                "--edge",
                "a-c",
                "-o",
                str(tmp_path / "a-c.safetensors"),
                "--pool",
                "last",
                "--max-seq",
                "16",
                "--json",
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["texts"] == len(corpus.default().calibration) and (info["d_a"], info["d_b"]) == (64, 96)


def test_a_missing_graph_file_is_called_a_graph_file(tmp_path, capsys):
    """`run --graph nope.toml` said 'no such chain file'."""
    missing = tmp_path / "nope.toml"
    for argv in (["run", "--graph", str(missing), "--text", "hi"], ["parity", "--graph", str(missing)]):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"error: {missing}: no such graph file\n"
    assert main(["run", "--graph", str(tmp_path / "g.txt"), "--text", "hi"]) == 2
    assert "a graph file is .toml or .json, not '.txt'" in capsys.readouterr().err
    assert main(["run", "--chain", str(missing), "--text", "hi"]) == 2
    assert capsys.readouterr().err == f"error: {missing}: no such chain file\n"


def test_a_graph_file_given_as_a_chain_suggests_what_the_command_takes(tmp_path, capsys):
    """`adapt --chain graph.toml` said "give it with --graph", an option adapt does not have:
    each command that reads a chain file says --graph only where it has it."""
    from prism_deploy.serving.repository import REPO_FORMAT, REPO_VERSION, write_manifest

    graph = write(
        tmp_path / "g.json",
        [
            {"model": "A", "name": "A"},
            {"adapter": "a.safetensors"},
            {"model": "B", "name": "B"},
            {"adapter": "c.safetensors", "inputs": ["A"]},
            {"model": "C"},
        ],
    )
    what = f"error: {graph}: stages.3 (stage 4) names its inputs or is a fusion: a graph file, not a chain file; "
    repo = tmp_path / "repo"
    repo.mkdir()
    write_manifest(repo, {"format": REPO_FORMAT, "version": REPO_VERSION, "models": {"ad": {"kind": "adapter"}}})
    (tmp_path / "pairs.safetensors").write_bytes(b"")
    commands = {
        "run": ["run", "--chain", str(graph), "--text", "hi"],
        "build": ["build", "--chain", str(graph), "-o", str(tmp_path / "out")],
        "collect": ["collect", "--chain", str(graph), "--hop", "1", "-o", str(tmp_path / "pairs.safetensors")],
        "parity": ["parity", "--chain", str(graph)],
        "adapt": [
            "adapt",
            str(repo),
            "--from",
            str(tmp_path),
            "--original",
            str(tmp_path / "pairs.safetensors"),
            "--chain",
            str(graph),
            "--hop",
            "1",
        ],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(what), (name, err)
        if name == "adapt":
            assert "--graph" not in err and "--model-a HF_DIR --model-b HF_DIR" in err
        else:
            assert err == what + "give it with --graph\n", (name, err)
    # a chain file whose model lacks its Hugging Face folder: the error names adapt, not collect
    chain = write(tmp_path / "c.json", [{"model": "A", "name": "A"}, {"adapter": "a.safetensors"}, {"model": "B"}])
    assert main([*commands["adapt"][:-4], "--chain", str(chain), "--hop", "1"]) == 2
    assert capsys.readouterr().err.endswith(": adapt needs its Hugging Face folder (hf = ...)\n")
