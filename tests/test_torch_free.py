"""The deploy core works where PyTorch is not installed.

Each check runs in a fresh interpreter in which ``import torch`` (and ``import transformers``)
fails, as on a deployment image that installed ``prism-deploy[ort]`` only: importing the
package, ``--help``, ``inspect``, ``plan``, ``export`` (every precision, and the fused graph),
``build --no-parity``, ``load_engines(DIR).run``, and a ``Pipeline`` over exported and built
folders. The commands that need PyTorch say so in one line and exit 2. The folders they run on
are made here, with PyTorch, beforehand.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from prism_deploy.cli.main import main
from prism_deploy.reference import random_adapter, simple_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "demo-adapter.safetensors"
BLOCK = "import sys\nfor _name in ('torch', 'transformers'):\n    sys.modules[_name] = None\n"


def run_without_torch(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``code`` in a new interpreter where importing torch or transformers raises ImportError."""
    script = BLOCK + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )


def cli_without_torch(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_without_torch(f"from prism_deploy.cli.main import main\nsys.exit(main({args!r}))\n", cwd)


def test_the_block_really_blocks(tmp_path):
    out = run_without_torch("import torch\n", tmp_path)
    assert out.returncode != 0 and "ModuleNotFoundError: import of torch halted" in out.stderr


def test_package_import_and_help_load_no_torch(tmp_path):
    out = run_without_torch(
        """
        import prism_deploy
        from prism_deploy.cli.main import build_parser
        build_parser().format_help()
        import prism_deploy.runtime, prism_deploy.format, prism_deploy.lower, prism_deploy.builder
        import prism_deploy.serving.stage_runtime, prism_deploy.serving.repository, prism_deploy.serving.backend
        assert sys.modules.get('torch') is None
        print(prism_deploy.__version__)
    """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert cli_without_torch(["--help"], tmp_path).returncode == 0


def test_inspect_plan_export_and_build_without_torch(tmp_path):
    inspect = cli_without_torch(["inspect", str(EXAMPLE), "--json"], tmp_path)
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["in_dim"] == 256
    assert cli_without_torch(["plan", "4096", "4096"], tmp_path).returncode == 0
    for precision in ("fp32", "fp16", "int8"):
        out = cli_without_torch(
            ["export", str(EXAMPLE), "-o", str(tmp_path / f"{precision}.onnx"), "--precision", precision], tmp_path
        )
        assert out.returncode == 0, out.stderr
    fused = cli_without_torch(["export", str(EXAMPLE), "-o", str(tmp_path / "fused.onnx"), "--plugin"], tmp_path)
    assert fused.returncode == 0, fused.stderr
    build = cli_without_torch(
        [
            "build",
            str(EXAMPLE),
            "-o",
            str(tmp_path / "eng"),
            "--target",
            "ort-cpu",
            "--precision",
            "fp32,int8",
            "--no-parity",
            "--json",
        ],
        tmp_path,
    )
    assert build.returncode == 0, build.stderr
    assert [e["action"] for e in json.loads(build.stdout)["engines"]] == ["built", "built"]


@pytest.mark.parametrize(
    "argv,what",
    [
        (["fit", "--x", "x.npy", "--z", "z.npy", "-o", "a.safetensors"], "prism-deploy fit needs torch"),
        (["parity", "a.safetensors", "--onnx", "a.onnx"], "prism-deploy parity needs torch"),
        (["export-model", "hf", "--role", "first", "-o", "out"], "prism-deploy export-model needs torch"),
        (["build", str(EXAMPLE), "-o", "eng", "--target", "ort-cpu"], "parity check"),
    ],
)
def test_commands_that_need_torch_say_so_in_one_line(tmp_path, argv, what):
    out = cli_without_torch(argv, tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and what in lines[0], out.stderr
    assert "pip install" in lines[0]


def test_engines_and_pipeline_run_without_torch(zoo, tmp_path):
    """Built adapter engines, exported and built model folders: the same numbers as in-process."""
    adapter = tmp_path / "a.safetensors"
    random_adapter(simple_config(64, 96, (4, 2), top_k=3), seed=5).save(adapter)
    for args in (
        ["build", str(adapter), "-o", str(tmp_path / "eng"), "--target", "ort-cpu"],
        ["build", "--model", str(zoo["A"]), "-o", str(tmp_path / "A"), "--target", "ort-cpu"],
        ["build", "--model", str(zoo["B"]), "-o", str(tmp_path / "B"), "--target", "ort-cpu"],
    ):
        assert main([*args, "--json"]) == 0
    x = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ids = np.array([[5, 17, 42, 7, 9]], dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)

    from prism_deploy.runtime import Pipeline, load_engines

    want_adapted = load_engines(tmp_path / "eng").run(x)
    want_logits = Pipeline(zoo["A"], tmp_path / "eng", zoo["B"])(ids)
    want_tokens = Pipeline(tmp_path / "A", tmp_path / "eng", tmp_path / "B").generate(ids, max_new_tokens=4)

    out = run_without_torch(
        f"""
        import numpy as np
        from prism_deploy.runtime import Pipeline, load_engines
        d = {str(tmp_path)!r}
        np.save(d + "/adapted.npy", load_engines(d + "/eng").run(np.load(d + "/x.npy")))
        ids = np.load(d + "/ids.npy")
        np.save(d + "/logits.npy", Pipeline({str(zoo["A"])!r}, d + "/eng", {str(zoo["B"])!r})(ids))
        np.save(d + "/tokens.npy", Pipeline(d + "/A", d + "/eng", d + "/B").generate(ids, max_new_tokens=4))
        # a .safetensors adapter is lowered on first use, without torch too
        Pipeline({str(zoo["A"])!r}, {str(adapter)!r}, {str(zoo["B"])!r})(ids)
        assert sys.modules.get('torch') is None
    """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "adapted.npy"), want_adapted)
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), want_logits)
    np.testing.assert_array_equal(np.load(tmp_path / "tokens.npy"), want_tokens)
