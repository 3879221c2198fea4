"""Issue 21 item 7b on the real SmolLM2: int4 first model -> fitted adapter -> fp32 last model
(benchmarks/quant_recovery.py; docs/real-models.md, "Quantization recovery")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prism_deploy.models import real
from tests.conftest import real_model_dir

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.xdist_group("real-models")]
ROOT = Path(__file__).resolve().parents[2]


def test_int4_first_adapter_fp32_last_recovers_over_identity_and_reports_the_refusal(tmp_path):
    smol = real_model_dir(real.SMOLLM2)
    out = tmp_path / "recovery.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "quant_recovery.py"),
            "--model",
            str(smol),
            "--work",
            str(tmp_path / "work"),
            "--texts",
            "40",
            "--windows",
            "2",
            "-o",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(out.read_text())
    # the export's own validation refuses plain int4 on this model (measured: agreement 0.695)
    assert r["export_int4_first_refused"].startswith("error: check failed: first graph on real text (int4)")
    q = r["quality_vs_fp32"]
    assert q["a_fp32_alone"]["agreement"] == 1.0
    # a final hidden state is no input embedding: identity is near chance; the adapter lifts it
    assert q["b_identity"]["agreement"] < 0.05
    assert q["c_adapter"]["agreement"] > q["b_identity"]["agreement"] + 0.05
    assert q["c_adapter"]["perplexity"] < q["b_identity"]["perplexity"] / 5
