"""Chains of N models: roles, the chain file, ``Chain`` against transformers + the reference
adapters (end to end, greedy tokens, hop by hop), bisection, bad chain files, and the whole CLI
path export-model -> collect -> fit -> build --chain -> run --chain -> parity --chain.

Tiny random local models of three families and widths (tests/model_helpers.py): GPT-2 (48
wide), Llama (64), Qwen2 (96); random gated adapters between them. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from prism_deploy.cli.main import main
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.fsutil import file_sha256
from prism_deploy.models import hf
from prism_deploy.models.lm_export import export_model
from prism_deploy.parity.chain_parity import ReferenceChain, check_chain_parity
from prism_deploy.reference import load_adapter, random_adapter, simple_config
from prism_deploy.runtime.chain import Chain, Pipeline
from tests.model_helpers import SENTENCES

WIDTH = {"gpt2": 48, "llama": 64, "qwen2": 96}


@pytest.fixture(scope="module")
def parts(zoo, tmp_path_factory):
    """Exports by role (first: GPT-2, middle: Llama and Qwen2, last: Qwen2 and GPT-2) and
    adapters between every pair of widths used."""
    root = tmp_path_factory.mktemp("chain")
    p = {"hf": zoo}
    for name, kind, role in (
        ("gpt2_first", "gpt2", "first"),
        ("llama_middle", "llama", "middle"),
        ("qwen2_middle", "qwen2", "middle"),
        ("gpt2_last", "gpt2", "last"),
    ):
        p[name] = root / name
        export_model(zoo[kind], role, p[name], max_seq=64)
    p["qwen2_last"] = zoo["B"]
    for a, b, seed in (("gpt2", "llama", 11), ("llama", "qwen2", 12), ("qwen2", "gpt2", 13)):
        path = root / f"{a}-{b}.safetensors"
        random_adapter(simple_config(WIDTH[a], WIDTH[b], (4, 2), top_k=3), seed=seed).save(path)
        p[f"{a}-{b}"] = path
    p["root"] = root
    return p


def write_chain(path: Path, stages: list[dict], **top) -> Path:
    path.write_text(json.dumps({**top, "stages": stages}))
    return path


def three_model_stages(parts) -> list[dict]:
    hfz = parts["hf"]
    return [
        {"model": str(parts["gpt2_first"]), "hf": str(hfz["gpt2"]), "name": "gpt2"},
        {"adapter": str(parts["gpt2-llama"]), "name": "a1"},
        {"model": str(parts["llama_middle"]), "hf": str(hfz["llama"]), "name": "llama"},
        {"adapter": str(parts["llama-qwen2"]), "name": "a2"},
        {"model": str(parts["qwen2_last"]), "hf": str(hfz["qwen2"]), "name": "qwen2"},
    ]


def ids_and_mask(vocab: int, batch: int = 2, seq: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[-1, :2] = 0  # one left-padded row
    return ids, mask


def transformers_greedy(parts, hf_kinds: list[str], adapters: list[Path], ids, mask, new_tokens: int) -> np.ndarray:
    """An independent greedy loop over the chain in transformers + the reference adapters."""
    models = [hf.load_causal_lm(parts["hf"][k]) for k in hf_kinds]
    refs = [load_adapter(a) for a in adapters]
    m = torch.from_numpy(mask)
    with torch.no_grad():
        x = hf.final_hidden(models[0], torch.from_numpy(ids), m)
        for adapter, model in zip(refs[:-1], models[1:-1]):
            x = hf.final_hidden(model, None, m, inputs_embeds=adapter(x).float())
        embeds = refs[-1](x).float()
        table = models[-1].get_input_embeddings().weight.detach().float()
        out = []
        for _ in range(new_tokens):
            logits, _ = hf.causal_lm_forward(models[-1], inputs_embeds=embeds, attention_mask=m)
            token = logits[:, -1].argmax(-1)
            out.append(token.numpy())
            embeds = torch.cat([embeds, table[token][:, None]], dim=1)
            m = torch.cat([m, torch.ones(m.shape[0], 1, dtype=m.dtype)], dim=1)
    return np.stack(out, axis=1)


def test_roles_are_named_by_what_goes_in_and_out(parts):
    for name, role, inputs, output in (
        ("gpt2_first", "first", "input_ids", "hidden"),
        ("llama_middle", "middle", "inputs_embeds", "hidden"),
        ("qwen2_last", "last", "inputs_embeds", "logits"),
    ):
        manifest = json.loads((parts[name] / "model.json").read_text())
        assert manifest["role"] == role
        model = onnx.load(str(parts[name] / manifest["files"]["graph"]["name"]), load_external_data=False)
        assert model.graph.input[0].name == inputs and model.graph.output[0].name == output
    middle = json.loads((parts["llama_middle"] / "model.json").read_text())
    assert set(middle["files"]) == {"graph"} and middle["validation"]["hidden"]["rel_l2"] < 1e-5


def test_old_role_names_still_work_and_say_the_new_one(zoo, tmp_path, capsys):
    capsys.readouterr()
    assert (
        main(
            [
                "export-model",
                str(zoo["gpt2"]),
                "--role",
                "upper",
                "-o",
                str(tmp_path / "g"),
                "--max-seq",
                "16",
                "--json",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert json.loads(out)["role"] == "first"
    assert err.strip().splitlines() == ["note: --role upper is now called --role first"]
    # a folder an earlier release wrote (role "upper") reads as role "first"
    meta = json.loads((tmp_path / "g" / "model.json").read_text())
    meta["role"] = "upper"
    (tmp_path / "g" / "model.json").write_text(json.dumps(meta))
    from prism_deploy.runtime.model_stage import ModelStage

    assert ModelStage(tmp_path / "g", "first").role == "first"


@pytest.mark.parametrize("built", [False, True], ids=["exported", "built"])
def test_three_model_chain_matches_transformers_and_the_reference(parts, tmp_path, built, capsys):
    chain_file = write_chain(tmp_path / "chain.json", three_model_stages(parts))
    if built:
        capsys.readouterr()
        assert (
            main(
                [
                    "build",
                    "--chain",
                    str(chain_file),
                    "-o",
                    str(tmp_path / "out"),
                    "--target",
                    "ort-cpu",
                    "--batch",
                    "1:2:4",
                    "--seq",
                    "1:8:16",
                    "--json",
                ]
            )
            == 0
        )
        report = json.loads(capsys.readouterr().out)
        assert len(report["stages"]) == 5 and report["chain_file"] == str(tmp_path / "out" / "chain.json")
        chain_file = tmp_path / "out" / "chain.json"
    chain = Chain.from_file(chain_file)
    assert [m.role for m in chain.models] == ["first", "middle", "last"]
    assert all(m.folder.built == built for m in chain.models)
    ids, mask = ids_and_mask(chain.first.vocab)
    ref = ReferenceChain(
        [parts["hf"][k] for k in ("gpt2", "llama", "qwen2")], [parts["gpt2-llama"], parts["llama-qwen2"]]
    )
    report = check_chain_parity(chain, ref, ids, mask, new_tokens=4)
    assert report["passed"], report["failures"]
    assert report["logits"]["rel_l2"] <= 1e-4 and report["logits"]["top1"] >= 0.99
    assert [h["passed"] for h in report["stages"]] == [True] * 5
    want = transformers_greedy(
        parts, ["gpt2", "llama", "qwen2"], [parts["gpt2-llama"], parts["llama-qwen2"]], ids, mask, 4
    )
    np.testing.assert_array_equal(chain.generate(ids, mask, max_new_tokens=4), want)
    assert set(chain.timings) >= {"gpt2", "a1", "llama", "a2", "qwen2_prefill", "qwen2_decode", "steps"}


def test_four_model_chain(parts):
    hfz = parts["hf"]
    stages = [
        parts["gpt2_first"],
        parts["gpt2-llama"],
        parts["llama_middle"],
        parts["llama-qwen2"],
        parts["qwen2_middle"],
        parts["qwen2-gpt2"],
        parts["gpt2_last"],
    ]
    chain = Chain(stages)
    assert [m.role for m in chain.models] == ["first", "middle", "middle", "last"]
    ids, mask = ids_and_mask(chain.first.vocab, seed=3)
    ref = ReferenceChain(
        [hfz["gpt2"], hfz["llama"], hfz["qwen2"], hfz["gpt2"]],
        [parts["gpt2-llama"], parts["llama-qwen2"], parts["qwen2-gpt2"]],
    )
    report = check_chain_parity(chain, ref, ids, mask, new_tokens=3)
    assert report["passed"], report["failures"]
    assert report["logits"]["rel_l2"] <= 1e-4
    want = transformers_greedy(
        parts,
        ["gpt2", "llama", "qwen2", "gpt2"],
        [parts["gpt2-llama"], parts["llama-qwen2"], parts["qwen2-gpt2"]],
        ids,
        mask,
        3,
    )
    np.testing.assert_array_equal(chain.generate(ids, mask, max_new_tokens=3), want)


def test_two_model_chain_is_the_pipeline(zoo):
    ids, mask = ids_and_mask(300, seed=5)
    chain = Chain([zoo["A"], zoo["adapter"], zoo["B"]])
    pipe = Pipeline(zoo["A"], zoo["adapter"], zoo["B"])
    np.testing.assert_array_equal(chain(ids, mask), pipe(ids, mask))
    np.testing.assert_array_equal(
        chain.generate(ids, mask, max_new_tokens=5), pipe.generate(ids, mask, max_new_tokens=5)
    )
    assert set(pipe.timings) >= {"model_a", "adapter", "model_b_prefill", "model_b_decode"}


def scaled_worker_adapter(src: Path, dst: Path, pipe: int, worker: int, factor: float) -> None:
    adapter = load_adapter(src)
    tensors = {k: v.clone() for k, v in adapter.tensors().items()}
    tensors[f"pipes.{pipe}.tiles"][worker] *= factor
    type(adapter)(adapter.config, tensors).save(dst)


@pytest.mark.parametrize("as_engines", [False, True], ids=["lowered", "engines"])
def test_bisect_names_the_adapter_its_pipe_and_worker(parts, tmp_path, as_engines, capsys):
    bad = tmp_path / "a2-bad.safetensors"
    scaled_worker_adapter(parts["llama-qwen2"], bad, pipe=0, worker=5, factor=4.0)
    stages = three_model_stages(parts)
    stages[3] = {"adapter": str(bad), "reference": str(parts["llama-qwen2"]), "name": "a2"}
    if as_engines:  # a black box: the blame comes from probing, not from stored tiles
        capsys.readouterr()
        assert (
            main(["build", str(bad), "-o", str(tmp_path / "eng"), "--target", "ort-cpu", "--no-parity", "--json"]) == 0
        )
        stages[3]["adapter"] = str(tmp_path / "eng")
    chain_file = write_chain(tmp_path / "chain.json", stages)
    capsys.readouterr()
    code = main(["parity", "--chain", str(chain_file), "--bisect", "--json", "--seq", "8"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert code == 1 and err.count("\n") == 1
    found = report["bisect"]
    assert found["found"] == 4 and found["kind"] == "adapter" and found["name"] == "a2"
    assert found["pipe"]["index"] == 0 and found["workers"][0]["worker"] == 5
    assert [h["passed"] for h in report["stages"]] == [True, True, True, False, True]  # charged to its own stage


def test_bisect_names_a_broken_middle_model(parts, tmp_path, capsys):
    broken = tmp_path / "llama_middle"
    shutil.copytree(parts["llama_middle"], broken)
    graph = broken / "middle.onnx"
    model = onnx.load(str(graph))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.3, init.name))
    onnx.save(model, str(graph))
    meta = json.loads((broken / "model.json").read_text())  # a re-export with other weights, hashes right
    meta["files"]["graph"]["sha256"] = file_sha256(graph)
    (broken / "model.json").write_text(json.dumps(meta))
    stages = three_model_stages(parts)
    stages[2]["model"] = str(broken)
    chain = Chain.from_file(write_chain(tmp_path / "chain.json", stages))
    ids, mask = ids_and_mask(chain.first.vocab)
    hfz = parts["hf"]
    report = check_chain_parity(
        chain,
        ReferenceChain([hfz["gpt2"], hfz["llama"], hfz["qwen2"]], [parts["gpt2-llama"], parts["llama-qwen2"]]),
        ids,
        mask,
    )
    assert not report["passed"]
    assert (
        report["bisect"]["found"] == 3 and report["bisect"]["kind"] == "model" and report["bisect"]["graph"] == "graph"
    )
    assert [h["passed"] for h in report["stages"]][:2] == [True, True] and not report["stages"][2]["passed"]


def test_bisect_names_the_decoding_graph_of_the_last_model(parts, tmp_path):
    broken = tmp_path / "qwen2_last"
    shutil.copytree(parts["qwen2_last"], broken)
    graph = broken / "last_with_past.onnx"
    model = onnx.load(str(graph))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.3, init.name))
    onnx.save(model, str(graph))
    meta = json.loads((broken / "model.json").read_text())
    meta["files"]["graph_with_past"]["sha256"] = file_sha256(graph)
    (broken / "model.json").write_text(json.dumps(meta))
    stages = three_model_stages(parts)
    stages[4]["model"] = str(broken)
    chain = Chain.from_file(write_chain(tmp_path / "chain.json", stages))
    ids, mask = ids_and_mask(chain.first.vocab)
    hfz = parts["hf"]
    report = check_chain_parity(
        chain,
        ReferenceChain([hfz["gpt2"], hfz["llama"], hfz["qwen2"]], [parts["gpt2-llama"], parts["llama-qwen2"]]),
        ids,
        mask,
        new_tokens=3,
        bisect=True,
    )
    # the last model runs its plain calls on the KV-cache graph too (one set of weights,
    # docs/model-forms.md): the prefill and the decoding figures both fail, and the file named is that graph
    graphs = report["stages"][4]["graphs"]
    assert not graphs["graph"]["passed"] and not graphs["graph_with_past"]["passed"] and not report["passed"]
    assert report["bisect"]["found"] == 5 and report["bisect"]["graph"] == "graph_with_past"


def bad_chain_cases(parts, tmp_path) -> list[tuple[str, object, str]]:
    good = three_model_stages(parts)
    wrong_width = [dict(s) for s in good]
    wrong_width[1]["adapter"] = str(parts["llama-qwen2"])  # 64 -> 96 where 48 -> 64 belongs
    missing = [dict(s) for s in good]
    missing[2]["model"] = str(tmp_path / "no-such-model")
    hashed = [dict(s) for s in good]
    hashed[1]["sha256"] = "0" * 64
    unknown = [dict(s) for s in good]
    unknown[3]["precison"] = "fp16"
    order = [good[1], good[0], *good[2:]]
    model_as_adapter = [dict(s) for s in good]
    model_as_adapter[1] = {"adapter": str(parts["gpt2_first"] / "first.onnx")}
    both = [dict(s) for s in good]
    both[1] = {"adapter": good[1]["adapter"], "model": good[0]["model"]}
    forged = [dict(s) for s in good]
    forged[1]["name"] = "a1\nerror: forged line"
    escaped = [dict(s) for s in good]
    escaped[2]["name"] = "\x1b[2Jllama"
    return [
        ("name with a newline", {"stages": forged}, "(stage 2): the name 'a1\\nerror: forged line' holds control"),
        ("name with an escape", {"stages": escaped}, "(stage 3): the name '\\x1b[2Jllama' holds control"),
        ("width", {"stages": wrong_width}, "stage 2 (adapter a1): in_dim 64 does not match the hidden width 48"),
        ("order", {"stages": order}, "stage 1"),
        ("missing", {"stages": missing}, "stage 3 (model llama)"),
        ("hash", {"stages": hashed}, "stage 2 (adapter a1)"),
        ("unknown", {"stages": unknown}, "unknown key(s) ['precison']"),
        ("two", {"stages": good[:2]}, "stages"),
        ("model graph as adapter", {"stages": model_as_adapter}, "not an adapter graph"),
        ("model and adapter in one stage", {"stages": both}, "(stage 2): a stage is a model or an adapter, not both"),
    ]


def test_bad_chain_files_exit_2_with_one_line(parts, tmp_path, capsys):
    (tmp_path / "ids.json").write_text("[[1, 2, 3]]")
    for name, obj, message in bad_chain_cases(parts, tmp_path):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(obj))
        capsys.readouterr()
        code = main(["run", "--chain", str(path), "--ids", str(tmp_path / "ids.json")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (name, err)
        assert str(path) in err[0]
    toml = tmp_path / "bad.toml"
    toml.write_text("[[stages]\nmodel = 1\n")
    assert main(["run", "--chain", str(toml), "--ids", str(tmp_path / "ids.json")]) == 2


def test_chain_toml_runs_from_its_own_folder(parts, tmp_path, capsys):
    """Paths in a chain file are relative to the file; tokenizers come from it too."""
    hfz = parts["hf"]
    for key in ("gpt2_first", "llama_middle", "qwen2_last"):
        shutil.copytree(parts[key], tmp_path / key)
    for key in ("gpt2-llama", "llama-qwen2"):
        shutil.copy(parts[key], tmp_path / f"{key}.safetensors")
    (tmp_path / "chain.toml").write_text(f'''name = "three"
[tokenizers]
first = "{hfz["gpt2"]}"
last = "{hfz["qwen2"]}"

[[stages]]
model = "gpt2_first"
[[stages]]
adapter = "gpt2-llama.safetensors"
[[stages]]
model = "llama_middle"
[[stages]]
adapter = "llama-qwen2.safetensors"
[[stages]]
model = "qwen2_last"
''')
    capsys.readouterr()
    assert (
        main(
            [
                "run",
                "--chain",
                str(tmp_path / "chain.toml"),
                "--text",
                "the quick brown fox",
                "--max-new-tokens",
                "3",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert len(result["generated_ids"][0]) == 3 and len(result["generated_text"]) == 1
    assert [s["kind"] for s in result["stages"]] == ["model", "adapter", "model", "adapter", "model"]


def test_whole_cli_path_export_collect_fit_build_run_parity(zoo, tmp_path, capsys):
    """Three Hugging Face folders and a text file to a checked, built, running chain."""
    import random

    rnd = random.Random(0)
    words = " ".join(SENTENCES).split()
    (tmp_path / "corpus.txt").write_text(
        "\n".join(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 12))) for _ in range(40)) + "\n"
    )
    for kind, role in (("gpt2", "first"), ("llama", "middle"), ("qwen2", "last")):
        assert (
            main(
                [
                    "export-model",
                    str(zoo[kind]),
                    "--role",
                    role,
                    "-o",
                    str(tmp_path / kind),
                    "--max-seq",
                    "32",
                    "--json",
                ]
            )
            == 0
        )
    stages: list[dict] = [
        {"model": "gpt2", "hf": str(zoo["gpt2"])},
        {"adapter": "a1.safetensors"},
        {"model": "llama", "hf": str(zoo["llama"])},
        {"adapter": "a2.safetensors"},
        {"model": "qwen2", "hf": str(zoo["qwen2"])},
    ]
    chain = write_chain(
        tmp_path / "chain.json", stages, tokenizers={"first": str(zoo["gpt2"]), "last": str(zoo["qwen2"])}
    )
    for hop, out in ((1, "a1"), (2, "a2")):
        pairs = tmp_path / f"pairs{hop}.safetensors"
        assert (
            main(
                [
                    "collect",
                    "--chain",
                    str(chain),
                    "--hop",
                    str(hop),
                    "--text",
                    str(tmp_path / "corpus.txt"),
                    "-o",
                    str(pairs),
                    "--pool",
                    "tokens",
                    "--batch",
                    "16",
                    "--json",
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "fit",
                    "--x",
                    f"{pairs}:X",
                    "--z",
                    f"{pairs}:Z",
                    "-o",
                    str(tmp_path / f"{out}.safetensors"),
                    "--grid",
                    "4",
                    "2",
                    "--top-k",
                    "3",
                    "--rounds",
                    "1",
                    "--gate-steps",
                    "30",
                    "--ridge",
                    "1e-3",
                    "--json",
                ]
            )
            == 0
        )
    capsys.readouterr()
    assert (
        main(
            [
                "build",
                "--chain",
                str(chain),
                "-o",
                str(tmp_path / "built"),
                "--target",
                "ort-cpu",
                "--batch",
                "1:2:4",
                "--seq",
                "1:8:16",
                "--json",
            ]
        )
        == 0
    )
    first = json.loads(capsys.readouterr().out)
    assert (
        main(
            [
                "build",
                "--chain",
                str(chain),
                "-o",
                str(tmp_path / "built"),
                "--target",
                "ort-cpu",
                "--batch",
                "1:2:4",
                "--seq",
                "1:8:16",
                "--json",
            ]
        )
        == 0
    )
    again = json.loads(capsys.readouterr().out)
    assert all(e["action"] == "built" for s in first["stages"] for e in s["engines"])
    assert all(e["action"] == "reused" for s in again["stages"] for e in s["engines"])  # a rebuild reuses every stage
    assert (
        main(["run", "--chain", str(tmp_path / "built"), "--text", "the lazy dog", "--max-new-tokens", "4", "--json"])
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["generated_ids"][0]) == 4
    assert (
        main(
            ["parity", "--chain", str(tmp_path / "built"), "--text", "Tiles of weights are routed", "--new-tokens", "3"]
        )
        == 0
    )
    assert "parity: passed" in capsys.readouterr().out


def test_chain_refuses_bad_inputs(parts):
    chain = Chain(
        [parts["gpt2_first"], parts["gpt2-llama"], parts["llama_middle"], parts["llama-qwen2"], parts["qwen2_last"]]
    )
    with pytest.raises(PrismInputError, match="vocabulary"):
        chain([[0, 10**6]])
    with pytest.raises(PrismInputError, match="max_new_tokens"):
        chain.generate([[1, 2]], max_new_tokens=0)
    with pytest.raises(PrismInputError, match="stage 3 \\(model model_2\\).*role 'first', 'middle' is needed"):
        Chain(
            [parts["gpt2_first"], parts["gpt2-llama"], parts["gpt2_first"], parts["llama-qwen2"], parts["qwen2_last"]]
        )


def test_ids_the_chain_refuses_are_charged_to_the_users_file(parts, tmp_path, capsys):
    """run/parity --ids: an id past the vocabulary or a prompt past max_seq named the runtime's
    `input_ids`, not the file the user gave."""
    chain_file = write_chain(tmp_path / "chain.json", three_model_stages(parts))
    big = tmp_path / "big.json"
    big.write_text("[1, 2, 1000000]")
    long = tmp_path / "long.npy"
    np.save(long, np.ones((1, 10_000), dtype=np.int64))
    for command in (["run"], ["parity"]):
        for path, message in ((big, "vocabulary"), (long, "more than the exported max_seq")):
            assert main([*command, "--chain", str(chain_file), "--ids", str(path)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {path}: ") and message in err and "input_ids" not in err
            assert err.count("\n") == 1


def test_a_two_model_width_refusal_names_the_adapter_file(zoo, tmp_path, capsys):
    """run --model-a/--adapter/--model-b named the adapter `stage 2 (adapter adapter)`."""
    narrow = tmp_path / "narrow.safetensors"
    random_adapter(simple_config(64, 48, (4, 2)), seed=1).save(narrow)
    with pytest.raises(
        PrismInputError, match=f"^{narrow} \\(adapter\\): out_dim 48 does not match the embedding width 96"
    ):
        Pipeline(zoo["A"], narrow, zoo["B"])
    code = main(
        [
            "run",
            "--model-a",
            str(zoo["A"]),
            "--adapter",
            str(narrow),
            "--model-b",
            str(zoo["B"]),
            "--ids",
            str(write_ids(tmp_path)),
        ]
    )
    assert code == 2 and capsys.readouterr().err.startswith(f"error: {narrow} (adapter): out_dim 48")
    with pytest.raises(
        PrismInputError, match="^stage 2 \\(adapter adapter\\): .*missing"
    ):  # a load error names it once
        Pipeline(zoo["A"], tmp_path / "missing.safetensors", zoo["B"])


def test_an_ambiguous_adapter_build_names_the_keyword_of_the_api_in_use(zoo, tmp_path, capsys):
    """A build folder with several engines: each API says how it picks one (issue 17)."""
    from prism_deploy.builder import BuildRequest, build_engines

    build = tmp_path / "a"
    build_engines(
        BuildRequest(adapter=zoo["adapter"], out_dir=build, target="ort-cpu", precisions=("fp32", "fp16")),
        log=lambda _m: None,
    ).raise_for_failures()
    with pytest.raises(PrismInputError, match=r"pick one with adapter_precision= \(one of fp16, fp32\)"):
        Pipeline(zoo["A"], build, zoo["B"])
    assert Pipeline(zoo["A"], build, zoo["B"], adapter_precision="fp16").adapter.precision == "fp16"
    code = main(
        [
            "run",
            "--model-a",
            str(zoo["A"]),
            "--adapter",
            str(build),
            "--model-b",
            str(zoo["B"]),
            "--ids",
            str(write_ids(tmp_path)),
        ]
    )
    assert code == 2 and "pick one with --adapter-precision" in capsys.readouterr().err


def write_ids(tmp_path: Path) -> Path:
    path = tmp_path / "ids.json"
    path.write_text("[[1, 2, 3]]")
    return path


def test_build_chain_writes_only_into_a_folder_it_owns(parts, tmp_path, capsys):
    """build --chain -o DIR replaced the input chain file and wrote among a user's files (issue 17)."""
    stages = three_model_stages(parts)
    inside = tmp_path / "inside"
    inside.mkdir()
    own = write_chain(inside / "chain.json", stages)
    before = own.read_text()
    assert main(["build", "--chain", str(own), "-o", str(inside), "--target", "ort-cpu"]) == 2
    assert "is the chain file being built" in capsys.readouterr().err and own.read_text() == before
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "chain.json").write_text("my notes")
    chain_file = write_chain(tmp_path / "chain.json", stages)
    assert main(["build", "--chain", str(chain_file), "-o", str(notes), "--target", "ort-cpu"]) == 2
    assert "was not written by build --chain" in capsys.readouterr().err
    assert (notes / "chain.json").read_text() == "my notes"
    (notes / "chain.json").unlink()
    (notes / "mine.txt").write_text("mine")
    assert main(["build", "--chain", str(chain_file), "-o", str(notes), "--target", "ort-cpu"]) == 2
    assert "did not write (mine.txt)" in capsys.readouterr().err and sorted(p.name for p in notes.iterdir()) == [
        "mine.txt"
    ]


def wrong_reference_cases(parts) -> list[tuple[int, str, str]]:
    """(stage index, key in the chain file, the wrong reference) for every kind of stage."""
    hfz = parts["hf"]
    return [
        (0, "hf", str(hfz["llama"])),
        (2, "hf", str(hfz["gpt2"])),
        (4, "hf", str(hfz["gpt2"])),
        (1, "reference", str(parts["llama-qwen2"])),
        (3, "reference", str(parts["gpt2-llama"])),
    ]


@pytest.mark.parametrize("bisect", [False, True])
def test_parity_with_another_models_reference_is_one_line(parts, tmp_path, capsys, bisect):
    for index, key, wrong in wrong_reference_cases(parts):
        stages = three_model_stages(parts)
        stages[index][key] = wrong
        chain_file = write_chain(tmp_path / f"chain{index}.json", stages)
        capsys.readouterr()
        code = main(
            ["parity", "--chain", str(chain_file), "--seq", "6", "--new-tokens", "2", *(["--bisect"] if bisect else [])]
        )
        out, err = capsys.readouterr()
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (index, err)
        assert f"stage {index + 1} (" in err and wrong in err and "not this stage's source" in err, err


def unbuildable_chain_cases(parts, tmp_path) -> list[tuple[str, list[dict], str]]:
    """Chains that fail the whole-chain check: every kind of misfit, at every place."""
    good = three_model_stages(parts)

    def changed(index: int, **stage) -> list[dict]:
        stages = [dict(s) for s in good]
        stages[index] = {**{k: v for k, v in stages[index].items() if k in ("name",)}, **stage}
        return stages

    return [
        ("width in", changed(1, adapter=str(parts["llama-qwen2"])), "stage 2 (adapter a1): in_dim 64 does not match"),
        ("width out", changed(3, adapter=str(parts["gpt2-llama"])), "stage 4 (adapter a2): in_dim 48 does not match"),
        ("role first", changed(0, model=str(parts["llama_middle"])), "stage 1 (model gpt2)"),
        ("role middle", changed(2, model=str(parts["qwen2_last"])), "'last', 'middle' is needed"),
        ("role last", changed(4, model=str(parts["qwen2_middle"])), "'middle', 'last' is needed"),
        ("missing adapter", changed(3, adapter=str(tmp_path / "no-such.safetensors")), "stage 4 (adapter a2)"),
        ("missing model", changed(4, model=str(tmp_path / "no-such-model")), "stage 5 (model qwen2)"),
        ("model as adapter", changed(3, adapter=str(parts["llama_middle"])), "a model export folder, where an adapter"),
        ("adapter as model", changed(2, model=str(parts["gpt2-llama"])), "a model stage is an export-model"),
    ]


def test_build_chain_checks_the_whole_chain_before_building(parts, tmp_path, capsys):
    for name, stages, needle in unbuildable_chain_cases(parts, tmp_path):
        chain_file = write_chain(tmp_path / f"{name}.json", stages)
        out = tmp_path / f"out-{name}"
        capsys.readouterr()
        code = main(["build", "--chain", str(chain_file), "-o", str(out), "--target", "ort-cpu", "--no-parity"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, (name, err)
        assert not out.exists(), name  # nothing was built


def test_a_failed_chain_build_leaves_nothing(parts, tmp_path, capsys, monkeypatch):
    from prism_deploy.builder import chain_source

    real = chain_source.build_model_engines

    def failing_at_the_second_model(request, *args, **kwargs):
        if request.model_dir == parts["llama_middle"]:
            raise PrismInputError("simulated failure of stage 3")
        return real(request, *args, **kwargs)

    monkeypatch.setattr(chain_source, "build_model_engines", failing_at_the_second_model)
    chain_file = write_chain(tmp_path / "chain.json", three_model_stages(parts))
    out = tmp_path / "out"
    assert main(["build", "--chain", str(chain_file), "-o", str(out), "--target", "ort-cpu", "--no-parity"]) == 2
    assert "simulated failure of stage 3" in capsys.readouterr().err
    assert not out.exists()  # stages 1 and 2 were built, then removed with the folder this run made
    out.mkdir()
    (out / "kept.txt").write_text("mine")
    assert (
        main(["build", "--chain", str(chain_file), "-o", str(out), "--target", "ort-cpu", "--no-parity", "--force"])
        == 2
    )
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]  # the user's file stays, the stages go


def test_build_chain_never_writes_through_a_link_at_a_stage_folder(parts, tmp_path, capsys):
    chain_file = write_chain(tmp_path / "chain.json", three_model_stages(parts))
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "1-gpt2").symlink_to(elsewhere, target_is_directory=True)
    assert main(["build", "--chain", str(chain_file), "-o", str(out), "--target", "ort-cpu", "--force"]) == 2
    assert "1-gpt2 is a symbolic link" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == [] and (out / "1-gpt2").is_symlink()


def test_a_killed_chain_builds_leftovers_do_not_block_a_rerun(parts, tmp_path, capsys):
    """A build --chain killed mid-stage leaves a stage folder with only the builder's temporary
    folder (and, before, its lock file): a rerun builds over them and leaves no lock files."""
    chain_file = write_chain(tmp_path / "chain.json", three_model_stages(parts))
    out = tmp_path / "out"
    (out / "1-gpt2" / ".build-k1ll3d00" / "gpt2.x1").mkdir(parents=True)
    (out / "1-gpt2" / ".build.lock").write_text("")
    (out / "3-llama").mkdir()
    assert main(["build", "--chain", str(chain_file), "-o", str(out), "--target", "ort-cpu", "--no-parity"]) == 0
    capsys.readouterr()
    for stage in ("1-gpt2", "2-a1", "3-llama", "4-a2", "5-qwen2"):
        names = {p.name for p in (out / stage).iterdir()}
        assert "manifest.json" in names and not any(n.startswith(".build") for n in names - {".build.lock"}), names
    assert not (out / "3-llama" / ".build.lock").exists()  # the folder is locked, not a file in it


@pytest.mark.parametrize("tolerance", ["fp32", "fp16", "int8", "int4"])
def test_parity_says_whether_greedy_agreement_is_part_of_the_check(parts, tmp_path, capsys, tolerance):
    chain_file = write_chain(tmp_path / "chain.json", three_model_stages(parts))
    capsys.readouterr()
    code = main(["parity", "--chain", str(chain_file), "--seq", "6", "--new-tokens", "2", "--tolerance", tolerance])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("greedy tokens:"))
    assert code == 0 and "parity: passed" in out
    assert ("not part of the check" in line) == (tolerance != "fp32"), line
    if tolerance != "fp32":
        assert f"at {tolerance}" in line


@pytest.mark.parametrize("value", [2, -1, 255])
def test_attention_mask_values_other_than_0_and_1_are_refused(parts, value):
    chain = Chain.from_file(write_chain(parts["root"] / "mask-chain.json", three_model_stages(parts)))
    ids, mask = ids_and_mask(chain.first.vocab)
    mask[0, -1] = value
    with pytest.raises(PrismInputError, match="attention_mask: values must be 0 .* or 1"):
        chain(ids, mask)
    with pytest.raises(PrismInputError, match="attention_mask: values must be 0 .* or 1"):
        chain.generate(ids, mask, max_new_tokens=1)
    mask[0, -1] = 1
    chain(ids, mask.astype(bool))  # booleans are 0 and 1
