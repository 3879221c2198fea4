"""A graph of the real models (the `real` set; docs/graphs.md): all-MiniLM-L6-v2 feeding two
adapters, each to its own SmolLM2-135M-Instruct last model (an fp32 and an fp16 export; an int8
export of SmolLM2 fails its own real-text gate), joined by a logit fusion; the adapters collected
and fitted per edge on texts of the default real-text corpus, then run and checked edge by edge
against the PyTorch reference. 139 s at load average 2 to 5; a SmolLM2 export alone took 8 minutes
at load average 19 (run with `-m real` or `-m slow`)."""

from __future__ import annotations

import json

import pytest

from prism_deploy.cli.main import main
from prism_deploy.models import real
from tests.conftest import real_model_dir

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_minilm_into_two_smollm2_branches_joined_by_logit_fusion(tmp_path, capsys):
    from prism_deploy.core import corpus

    minilm, smol = real_model_dir(real.MINILM), real_model_dir(real.SMOLLM2)
    exports = {}
    for key, source, role, precision in (
        ("minilm", minilm, "first", "fp32"),
        ("fp32", smol, "last", "fp32"),
        ("fp16", smol, "last", "fp16"),
    ):
        exports[key] = tmp_path / key
        assert (
            main(
                [
                    "export-model",
                    str(source),
                    "--role",
                    role,
                    "--precision",
                    precision,
                    "-o",
                    str(exports[key]),
                    "--max-seq",
                    "32",
                    "--json",
                ]
            )
            == 0
        )
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(corpus.default().calibration[:24]) + "\n")
    graph = tmp_path / "graph.json"
    graph.write_text(
        json.dumps(
            {
                "tokenizers": {"first": str(minilm), "last": str(smol)},
                "stages": [
                    {"name": "minilm", "model": str(exports["minilm"]), "hf": str(minilm)},
                    {"name": "to-fp32", "adapter": str(tmp_path / "to-fp32.safetensors")},
                    {"name": "smol-fp32", "model": str(exports["fp32"]), "hf": str(smol)},
                    {"name": "to-fp16", "adapter": str(tmp_path / "to-fp16.safetensors"), "inputs": ["minilm"]},
                    {"name": "smol-fp16", "model": str(exports["fp16"]), "hf": str(smol)},
                    {"name": "mix", "fusion": "logits", "inputs": ["smol-fp32", "smol-fp16"], "weights": [0.5, 0.5]},
                ],
            }
        )
    )
    for edge in ("to-fp32", "to-fp16"):
        capsys.readouterr()  # the exports' and the last fit's JSON
        pairs = tmp_path / f"{edge}.pairs.safetensors"
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
                    str(pairs),
                    "--pool",
                    "tokens",
                    "--max-seq",
                    "32",
                    "--json",
                ]
            )
            == 0
        )
        info = json.loads(capsys.readouterr().out)
        assert (info["d_a"], info["d_b"]) == (384, 576) and info["rows"] > 300
        assert (
            main(
                [
                    "fit",
                    "--x",
                    f"{pairs}:X",
                    "--z",
                    f"{pairs}:Z",
                    "-o",
                    str(tmp_path / f"{edge}.safetensors"),
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
        main(["run", "--graph", str(graph), "--text", "The capital of France is", "--max-new-tokens", "4", "--json"])
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["generated_ids"][0]) == 4
    code = main(
        [
            "parity",
            "--graph",
            str(graph),
            "--text",
            "Every object has an identity, a type and a value.",
            "--new-tokens",
            "3",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    # every fp32 edge is within fp32 tolerances; the fp16 last model on the adapter's embeddings
    # may miss its bound (docs/graphs.md measured rel L2 0.0224 > 0.02), and then bisect names it
    assert all(s["passed"] for s in report["stages"] if s["name"] != "smol-fp16")
    assert report["greedy"]["match"] == 1.0 and report["logits"]["top1"] >= 0.95
    assert code == (0 if report["passed"] else 1)
    if not report["passed"]:
        assert report["bisect"]["name"] == "smol-fp16" and report["bisect"]["edge"] == "to-fp16 -> smol-fp16"
