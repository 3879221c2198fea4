"""Triton repositories without a server: schema checks, both forms, the chain's models, bad input.

The native form cannot run here (the bundled server has only the Python backend), so its
configurations are checked by Triton's schema and against the ``model.onnx`` files they point
at, opened with ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from prism_deploy.cli.main import main
from prism_deploy.core.errors import PrismInputError
from prism_deploy.models.lm_export import export_model
from prism_deploy.serving import repository
from prism_deploy.serving import triton_config as cfg
from prism_deploy.serving.stage_runtime import inspect_stage


def _adapter_config(**overrides):
    base = {
        "name": "adapter",
        "backend": "python",
        "max_batch_size": 8,
        "input": [{"name": "hidden", "data_type": "TYPE_FP32", "dims": [-1, 64]}],
        "output": [{"name": "adapted", "data_type": "TYPE_FP32", "dims": [-1, 96]}],
        "dynamic_batching": {"max_queue_delay_microseconds": 100},
    }
    base.update(overrides)
    return base


def test_config_renders_text_that_triton_parses_back():
    text = cfg.render(_adapter_config())
    message = cfg.parse_text(text, "t")
    assert message.max_batch_size == 8 and list(message.input[0].dims) == [-1, 64]
    assert message.dynamic_batching.max_queue_delay_microseconds == 100


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"max_batch_sizes": 4}, "does not fit Triton's schema"),  # unknown field
        ({"input": [{"name": "hidden", "data_type": "TYPE_FP33", "dims": [64]}]}, "schema"),  # unknown enum
        ({"max_batch_size": 0}, "dynamic batching needs max_batch_size > 0"),
        ({"input": [{"name": "hidden", "data_type": "TYPE_FP32", "dims": [0, 64]}]}, "dims"),
        ({"dynamic_batching": {"preferred_batch_size": [16]}}, "preferred batch size 16"),
    ],
)
def test_config_refuses_what_triton_would(bad, words):
    with pytest.raises(PrismInputError, match=words):
        cfg.render(_adapter_config(**bad))


def test_text_parser_names_the_file_on_a_typo():
    with pytest.raises(PrismInputError, match="x/config.pbtxt: not a valid Triton model configuration"):
        cfg.parse_text('name: "a"\nmax_batch_sise: 3\n', "x/config.pbtxt")


def _ensemble(steps, outputs=None):
    return {
        "name": "chain",
        "platform": "ensemble",
        "max_batch_size": 8,
        "input": [{"name": "h", "data_type": "TYPE_FP32", "dims": [-1, 64]}],
        "output": outputs or [{"name": "out", "data_type": "TYPE_FP32", "dims": [-1, 96]}],
        "ensemble_scheduling": {"step": steps},
    }


def test_ensemble_wiring_is_checked():
    adapter = cfg.parse_text(cfg.render(_adapter_config()), "a")
    good = _ensemble(
        [{"model_name": "adapter", "model_version": -1, "input_map": {"hidden": "h"}, "output_map": {"adapted": "out"}}]
    )
    cfg.check_repository({"adapter": adapter, "chain": cfg.parse_text(cfg.render(good), "c")})
    unfed = _ensemble(
        [
            {
                "model_name": "adapter",
                "model_version": -1,
                "input_map": {"hidden": "nowhere"},
                "output_map": {"adapted": "out"},
            }
        ]
    )
    with pytest.raises(PrismInputError, match="reads 'nowhere'"):
        cfg.check_repository({"adapter": adapter, "chain": cfg.parse_text(cfg.render(unfed), "c")})
    wrong = _ensemble(
        [
            {
                "model_name": "adapter",
                "model_version": -1,
                "input_map": {"hidden": "h"},
                "output_map": {"adapted": "out"},
            }
        ],
        outputs=[{"name": "out", "data_type": "TYPE_FP16", "dims": [-1, 96]}],
    )
    with pytest.raises(PrismInputError, match="output 'out' is TYPE_FP32"):
        cfg.check_repository({"adapter": adapter, "chain": cfg.parse_text(cfg.render(wrong), "c")})


def _written_configs(repo: Path) -> dict[str, object]:
    return {p.parent.name: cfg.parse_text(p.read_text(), str(p)) for p in repo.glob("*/config.pbtxt")}


def test_python_form_of_the_two_model_chain(serving_stages, tmp_path, capsys):
    z = serving_stages
    repo = tmp_path / "repo"
    assert main(["triton", str(z["A"]), str(z["gated_build"]), str(z["B"]), "-o", str(repo), "--stream"]) == 0
    assert "repository:" in capsys.readouterr().out
    configs = _written_configs(repo)
    assert set(configs) == {"first", "adapter", "last", "last_decode", "chain", "generate", "generate_stream"}
    cfg.check_repository(configs)
    adapter = configs["adapter"]
    assert adapter.backend == "python" and adapter.max_batch_size == 32  # the build profile's batch max
    assert list(adapter.dynamic_batching.preferred_batch_size) == [4, 32]
    assert adapter.instance_group[0].kind == adapter.instance_group[0].KIND_CPU
    steps = [s.model_name for s in configs["chain"].ensemble_scheduling.step]
    assert steps == ["first", "adapter", "last"]
    assert configs["generate_stream"].model_transaction_policy.decoupled
    assert json.loads(configs["generate"].parameters["stages"].string_value) == [
        {"model": "first", "kind": "first"},
        {"model": "adapter", "kind": "adapter"},
    ]
    # each version carries the entry point and its stage's files, hashes as the sources'
    assert (repo / "adapter" / "1" / "model.py").read_text() == repository.ENTRY_FILE.read_text()
    stage_manifest = json.loads((repo / "adapter" / "1" / "stage" / "manifest.json").read_text())
    assert len(stage_manifest["engines"]) == 1
    part = stage_manifest["engines"][0]["parts"][0]
    assert hashlib.sha256((repo / "adapter" / "1" / "stage" / part["file"]).read_bytes()).hexdigest() == part["sha256"]
    assert (repo / "generate" / "1" / "embed_tokens.npy").is_file() and (repo / "chain" / "1").is_dir()
    record = json.loads((repo / repository.REPO_MANIFEST).read_text())
    assert record["chain"] == ["first", "adapter", "last"] and record["models"]["adapter"]["versions"] == [1]


def test_native_form_configs_match_the_engines(serving_stages, tmp_path):
    z = serving_stages
    repo = tmp_path / "native"
    assert (
        main(["triton", str(z["A"]), str(z["gated_build"]), str(z["B"]), "-o", str(repo), "--backend", "native"]) == 0
    )
    configs = _written_configs(repo)
    cfg.check_repository(configs)
    for name in ("first", "adapter", "last", "last_decode"):
        message = configs[name]
        assert message.platform == "onnxruntime_onnx"
        text = (repo / name / "config.pbtxt").read_text()
        repository.check_native_onnx(text, repo / name / "1" / "model.onnx", name)  # as ONNX Runtime opens it
    adapter = configs["adapter"]
    config = json.loads((z["gated_build"] / "manifest.json").read_text())["adapter"]["config"]
    assert [list(adapter.input[0].dims), list(adapter.output[0].dims)] == [
        [-1, config["in_dim"]],
        [-1, config["out_dim"]],
    ]
    assert adapter.optimization.graph.level == 2  # built engines are optimized offline: ORT_DISABLE_ALL
    assert configs["last_decode"].max_batch_size == 0 and configs["generate"].backend == "python"
    # a config that disagrees with its model.onnx is caught
    text = (repo / "adapter" / "config.pbtxt").read_text().replace("dims: 96", "dims: 95")
    with pytest.raises(PrismInputError, match="declared TYPE_FP32 \\[-1, 95\\]"):
        repository.check_native_onnx(text, repo / "adapter" / "1" / "model.onnx", "adapter")


def test_bad_input_writes_nothing(serving_stages, tmp_path, capsys):
    z = serving_stages
    out = tmp_path / "repo"
    # wrong order: an adapter cannot come first in a chain with models
    assert main(["triton", str(z["gated_build"]), str(z["A"]), str(z["B"]), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: stages adapter -> first -> last")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # a folder that is no stage
    assert main(["triton", str(tmp_path), "-o", str(out)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    # an existing non-empty repository is never overwritten
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["triton", str(z["dense_build"]), "-o", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_three_model_chain_falls_out_of_the_same_code(serving_stages, tmp_path):
    """first -> adapter -> middle -> adapter -> last: names, ensemble order, generate's prefix."""
    from prism_deploy.builder import BuildRequest, build_engines
    from prism_deploy.reference import random_adapter, simple_config

    z = serving_stages
    middle = tmp_path / "M"
    export_model(z["qwen2"], "middle", middle, max_seq=64)
    random_adapter(simple_config(96, 96, (4, 4)), seed=9).save(tmp_path / "a2.safetensors")
    build_engines(
        BuildRequest(
            adapter=tmp_path / "a2.safetensors", out_dir=tmp_path / "a2", target="ort-cpu", precisions=("fp32",)
        ),
        log=lambda _m: None,
    ).raise_for_failures()
    stages = [z["A"], z["gated_build"], middle, tmp_path / "a2", z["B"]]
    entries, manifest = repository.plan(stages, repository.Options())
    names = [e.name for e in entries]
    assert names[:5] == ["first", "adapter_1", "middle_1", "adapter_2", "last"]
    assert manifest["chain"] == names[:5]
    chain = next(e for e in entries if e.name == "chain").config["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in chain] == names[:5]
    assert chain[2]["input_map"] == {"inputs_embeds": "adapter_1_adapted", "attention_mask": "attention_mask"}
    generate = next(e for e in entries if e.name == "generate").config["parameters"]
    assert [s["kind"] for s in json.loads(generate["stages"]["string_value"])] == [
        "first",
        "adapter",
        "middle",
        "adapter",
    ]
    # a width that does not connect is refused before anything is written
    with pytest.raises(PrismInputError, match="does not match"):
        repository.plan([z["A"], z["gated_build"], middle, z["gated_build"], z["B"]], repository.Options())
    assert inspect_stage(middle).kind == "middle"


def test_update_refuses_a_shape_change_and_writes_nothing(serving_stages, tmp_path, capsys):
    from prism_deploy.reference import random_adapter, simple_config

    z = serving_stages
    repo = tmp_path / "repo"
    assert main(["triton", str(z["A"]), str(z["gated_build"]), str(z["B"]), "-o", str(repo)]) == 0
    wide = tmp_path / "wide.safetensors"
    random_adapter(simple_config(64, 80, (4, 2)), seed=1).save(wide)
    before = sorted(p.name for p in (repo / "adapter").iterdir())
    capsys.readouterr()
    # inside a chain the neighbours fix the widths: refused even when allowed
    for extra in ([], ["--allow-shape-change"]):
        assert main(["triton", "update", str(repo), "--adapter", str(wide), "--no-load", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "64 -> 80, the served adapter is 64 -> 96" in err[0] and str(wide) in err[0]
    assert sorted(p.name for p in (repo / "adapter").iterdir()) == before


def test_update_writes_the_next_version_without_a_server(serving_stages, tmp_path, capsys):
    z = serving_stages
    repo = tmp_path / "repo"
    assert main(["triton", str(z["dense_build"]), "-o", str(repo)]) == 0
    capsys.readouterr()
    assert main(["triton", "update", str(repo), "--adapter", str(z["dense_new"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == 2 and report["server"] is None and report["parity"]["passed"]
    assert sorted(p.name for p in (repo / "adapter").iterdir()) == ["1", "2", "config.pbtxt"]  # no staging left
    stage = json.loads((repo / "adapter" / "2" / "stage" / "manifest.json").read_text())
    assert stage["adapter"]["sha256"] == hashlib.sha256(z["dense_new"].read_bytes()).hexdigest()
    assert json.loads((repo / repository.REPO_MANIFEST).read_text())["models"]["adapter"]["versions"] == [1, 2]


def test_serve_refuses_a_folder_that_is_no_repository(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}: no prism-repository.json")


def test_the_serving_layer_imports_no_pytorch():
    """Every serving module imports with PyTorch made unimportable (the package roots registered
    bare, as the backend's model.py does until issue 13 makes `import prism_deploy` torch-free)."""
    import subprocess
    import sys

    code = f"""
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("PyTorch is blocked in this test")
sys.meta_path.insert(0, Block())
runpy.run_path({str(repository.ENTRY_FILE)!r})
for name in ("stage_runtime", "backend", "triton_config", "repository", "env", "server", "update"):
    __import__("prism_deploy.serving." + name)
print("torch" in sys.modules)
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_update_with_allow_shape_change_rewrites_a_standalone_adapters_widths(serving_stages, tmp_path, capsys):
    from prism_deploy.reference import random_adapter, simple_config

    z = serving_stages
    repo = tmp_path / "repo"
    assert main(["triton", str(z["dense_build"]), "-o", str(repo)]) == 0
    wide = tmp_path / "wide.safetensors"
    random_adapter(simple_config(64, 80, (4, 2)), seed=1).save(wide)
    assert main(["triton", "update", str(repo), "--adapter", str(wide), "--no-load"]) == 2  # not without the flag
    assert main(["triton", "update", str(repo), "--adapter", str(wide), "--no-load", "--allow-shape-change"]) == 0
    message = cfg.parse_text((repo / "adapter" / "config.pbtxt").read_text(), "adapter")
    assert list(message.input[0].dims) == [-1, 64] and list(message.output[0].dims) == [-1, 80]
    record = json.loads((repo / repository.REPO_MANIFEST).read_text())["models"]["adapter"]
    assert record["outputs"][0]["dims"] == [-1, 80] and record["versions"] == [1, 2]


@pytest.mark.parametrize("where", ["model copies", "engine part"])
def test_manifest_names_outside_the_folder_are_refused_before_anything_is_written(where, serving_stages, tmp_path):
    """A build manifest naming ``../victim`` made ``triton`` overwrite a file outside the repository."""
    import shutil as sh

    z = serving_stages
    stage = tmp_path / "a" / "b" / "q"
    sh.copytree(z["B_build"], stage)
    victim = tmp_path / "a" / "victim.txt"
    victim.write_text("precious")
    evil = b"attacker"
    manifest = json.loads((stage / "manifest.json").read_text())
    record = {"file": "../../victim.txt", "sha256": hashlib.sha256(evil).hexdigest(), "bytes": len(evil)}
    if where == "model copies":
        manifest["model"]["copies"].append(record)
    else:
        manifest["engines"][0]["parts"][0].update(record)
    (stage / "manifest.json").write_text(json.dumps(manifest))
    stages = [z["A_build"], z["gated_build"], stage]
    with pytest.raises(PrismInputError, match="not a plain file name"):
        repository.plan(stages, repository.Options())
    assert main(["triton", *map(str, stages), "-o", str(tmp_path / "repo")]) == 2
    assert victim.read_text() == "precious" and not (tmp_path / "repo").exists()


def test_engine_id_picks_among_a_whole_and_a_per_pipe_build(serving_stages, tmp_path):
    from prism_deploy.builder import BuildRequest, build_engines

    out = tmp_path / "eng"
    for per_pipe in (False, True):
        build_engines(
            BuildRequest(
                adapter=serving_stages["gated"], out_dir=out, target="ort-cpu", precisions=("fp32",), per_pipe=per_pipe
            ),
            log=lambda _m: None,
        ).raise_for_failures()
    with pytest.raises(PrismInputError, match="--engine-id"):
        inspect_stage(out, precision="fp32")
    ids = [e["id"] for e in json.loads((out / "manifest.json").read_text())["engines"]]
    assert inspect_stage(out, engine_id=ids[1]).details["engine_id"] == ids[1]
