"""The whole package type-checks under the project's mypy settings (pyproject.toml).

The TensorRT module is checked against TensorRT's stubs separately (tests/trt/test_plugin.py).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_package_type_checks():
    out = subprocess.run([sys.executable, "-m", "mypy", "prism_deploy"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
