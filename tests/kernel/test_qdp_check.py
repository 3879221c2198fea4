"""tools/qdp_check.py: the plugin's definitions under NVIDIA's own ``tensorrt.plugin`` code.

That code is not on PyPI apart from full TensorRT, so the check needs a checkout of
github.com/NVIDIA/TensorRT named by ``$PRISM_DEPLOY_TRT_SOURCE``; without one it skips. Its
result on this project's dev machine is recorded in plugins/tile_dispatch/README.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "qdp_check.py"
SOURCE = os.environ.get("PRISM_DEPLOY_TRT_SOURCE")


def test_without_a_tensorrt_source_it_is_bad_input(tmp_path):
    done = subprocess.run(
        [sys.executable, str(TOOL), "--trt-source", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: --trt-source") and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not SOURCE, reason="set PRISM_DEPLOY_TRT_SOURCE to a checkout of NVIDIA/TensorRT to run it")
def test_plugin_definitions_pass_under_tensorrt_plugin():
    pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (pip install tensorrt-rtx-cu13)")
    from prism_deploy.kernel.nvrtc import nvrtc_status

    ok, why = nvrtc_status()
    if not ok:
        pytest.skip(f"aot_impl compiles the kernel with NVRTC: {why}")
    done = subprocess.run(
        [sys.executable, str(TOOL), "--trt-source", SOURCE], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "negative control" in done.stdout and "FAIL" not in done.stdout
