"""``export_model`` end to end on a language model whose float weights exceed 2 GiB (issue 28:
"a model whose export exceeds 2 GiB is exported in a slow test, measuring its peak memory"),
marked ``slow``.

A random Llama (2048 wide, 10 layers, MLP 5632, 32,000 tokens, untied head: 571 M parameters,
2.28 GB of float32) is exported as ``last`` at int8 in a fresh process, without validation (a
random model's nearly flat logits fail the int8 top-1 gate; the validation's memory is measured
in docs/quantized-models.md). Its graphs hold 2.0 GB of weights, under the 2 GiB above which the
tracer writes external data: the path where the tracer's in-memory serialization took 8.4 GB
and the export 10.6 GB above its baseline, before the weights were streamed from the PyTorch
tensors (prism_deploy.models.trace). The float graphs are saved with external data, the checker
never reads a weight, the PyTorch model is let go while quantizing and the quantized weights
are written from arrays. Bound: the peak above the process's baseline (after imports) within
1.5x the float weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))

MAKE = textwrap.dedent("""
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=10,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=None)
    model = LlamaForCausalLM(config)
    print(sum(p.numel() * p.element_size() for p in model.parameters()))
    model.save_pretrained(sys.argv[1])
""")

EXPORT = textwrap.dedent("""
    import json, sys
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    from prism_deploy.models.lm_export import export_model
    import numpy, onnx, onnxruntime, torch, transformers
    base = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    manifest = export_model(sys.argv[1], "last", sys.argv[2], precision="int8", max_seq=64, validate=False)
    json.dump({"base": base, "peak": status("VmHWM:"), "files": manifest["files"]}, open(sys.argv[3], "w"))
""")


@pytest.mark.slow
def test_an_int8_export_over_2_gib_stays_within_1_5x_its_weights(tmp_path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    hf_dir, out, result = tmp_path / "big", tmp_path / "out", tmp_path / "measured.json"
    made = subprocess.run(
        [sys.executable, "-c", MAKE, str(hf_dir)], check=True, env=ENV, timeout=1800, capture_output=True, text=True
    )
    float_bytes = int(made.stdout.split()[-1])
    assert float_bytes > 2 * 2**30
    subprocess.run(
        [sys.executable, "-c", EXPORT, str(hf_dir), str(out), str(result)], check=True, env=ENV, timeout=3600
    )
    measured = json.loads(result.read_text())
    print(
        f"float weights {float_bytes / 1e9:.2f} GB, peak above baseline {(measured['peak'] - measured['base']) / 1e9:.2f} GB"
    )
    assert measured["peak"] - measured["base"] <= 1.5 * float_bytes
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["precision"] == "int8" and manifest["quantization"]["graphs"]
    import onnxruntime as ort

    ort.InferenceSession(str(out / manifest["files"]["graph_with_past"]["name"]), providers=["CPUExecutionProvider"])
