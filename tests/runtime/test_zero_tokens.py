"""Zero tokens are legal input to a deployed adapter (issue 17, section 2): an empty result of
the right shape, in every precision and gated form, fused or not, from the graphs themselves
(ONNX Runtime's batched MatMul dies of SIGFPE on zero rows: the graph guards it), from built
engines and from the in-process runners. Each graph runs in a child process, so that a crash
is a failed test and not a dead test run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from prism_deploy.format import read_adapter_file
from prism_deploy.lower import export_onnx

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "demo-adapter.safetensors"  # dense, gated form B and form A pipes
SHAPES = [(0, 5), (2, 0), (0, 0), (1, 3)]  # [batch, seq]; the last one is the control


def run_child(code: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-600:]}"
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("form", ["A", "B", "sparse", "grouped"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int8-qdq", "fused"])
def test_every_graph_answers_zero_tokens_itself(precision, form, tmp_path):
    adapter = read_adapter_file(EXAMPLE)
    path = tmp_path / "a.onnx"
    if precision == "fused":
        from prism_deploy.fuse import export_fused

        export_fused(adapter, path)
    else:
        calib = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
        export_onnx(
            adapter, path, precision=precision, gated_form=form, calib=calib if precision == "int8-qdq" else None
        )
    out = run_child(f"""
        import json, numpy as np
        from prism_deploy.runtime.adapter_session import AdapterGraph
        graph = AdapterGraph({str(path)!r}, "cpu")
        shapes = {{}}
        for b, s in {SHAPES!r}:
            y = graph.run(np.zeros((b, s, 256), np.float32))
            shapes[f"{{b}}x{{s}}"] = [list(y.shape), str(y.dtype), bool(np.isfinite(y).all())]
        print(json.dumps(shapes))
    """)
    for b, s in SHAPES:
        assert out[f"{b}x{s}"] == [[b, s, 160], "float32", True]


def test_built_engines_answer_zero_tokens(tmp_path):
    from prism_deploy.builder import BuildRequest, build_engines

    build_engines(
        BuildRequest(adapter=EXAMPLE, out_dir=tmp_path / "e", target="ort-cpu", precisions=("fp32", "fp16", "int8")),
        log=lambda _m: None,
    ).raise_for_failures()
    out = run_child(f"""
        import json, numpy as np
        from prism_deploy.runtime import load_engines
        result = {{}}
        for precision in ("fp32", "fp16", "int8"):
            engines = load_engines({str(tmp_path / "e")!r}, precision=precision)
            result[precision] = [list(engines.run(np.zeros(shape, np.float32)).shape)
                                 for shape in [(0, 256), (2, 0, 256), (0, 5, 256)]]
        print(json.dumps(result))
    """)
    for precision in ("fp32", "fp16", "int8"):
        assert out[precision] == [[0, 160], [2, 0, 160], [0, 5, 160]]
