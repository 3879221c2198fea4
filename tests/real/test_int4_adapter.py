"""int4 on a real fitted adapter (the `real` set): random weights prove the int4 plumbing, not that
4-bit tiles keep a fitted adapter within the int4 tolerance on real inputs. The adapter is fitted as
the real chain's is (docs/real-models.md: MiniLM hidden states -> SmolLM2 input embeddings on the
corpus' calibration text), at a small size and with a grid whose tile width (384 / 3 = 128) int4
takes; exported at int4, int8 and fp32 as ort-cpu builds export them, it is checked by ``check_parity``
against its float32 PyTorch reference on held-out MiniLM hidden states."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prism_deploy.cli.main import main
from prism_deploy.models import real
from tests.conftest import real_model_dir

pytestmark = [pytest.mark.real, pytest.mark.xdist_group("real-models")]

PARAGRAPHS = 64  # of the corpus' calibration part, one per line
HELD_OUT = 0.25  # the last quarter of the token rows (the last paragraphs): not fitted on


def collect_and_fit(tmp_path, capsys):
    """(the fitted adapter's file, held-out X rows [n, 384]) of a small real fit."""
    from safetensors.numpy import load_file, save_file

    from prism_deploy.core import corpus

    texts = tmp_path / "calibration.txt"
    texts.write_text("\n".join(corpus.default().calibration[:PARAGRAPHS]) + "\n")
    pairs = tmp_path / "pairs.safetensors"
    minilm, smol = real_model_dir(real.MINILM), real_model_dir(real.SMOLLM2)
    args = ["--text", str(texts), "-o", str(pairs), "--pool", "tokens", "--max-seq", "64", "--json"]
    assert main(["collect", "--model-a", str(minilm), "--model-b", str(smol), *args]) == 0
    capsys.readouterr()
    tensors = load_file(str(pairs))
    x, z = tensors["X"], tensors["Z"]
    cut = int(len(x) * (1 - HELD_OUT))
    save_file(
        {"X": np.ascontiguousarray(x[:cut]), "Z": np.ascontiguousarray(z[:cut])}, str(tmp_path / "train.safetensors")
    )
    adapter = tmp_path / "adapter.safetensors"
    train = tmp_path / "train.safetensors"
    fit = ["--grid", "4", "3", "--top-k", "3", "--rounds", "1", "--gate-steps", "30", "--ridge", "1e-3", "--json"]
    assert main(["fit", "--x", f"{train}:X", "--z", f"{train}:Z", "-o", str(adapter), *fit]) == 0
    capsys.readouterr()
    return adapter, np.ascontiguousarray(x[cut:], dtype=np.float32)


def test_int4_of_a_real_fitted_adapter_is_within_the_int4_tolerance(tmp_path, capsys):
    from prism_deploy.lower import export_onnx
    from prism_deploy.parity import check_parity
    from prism_deploy.reference import load_adapter

    path, held = collect_and_fit(tmp_path, capsys)
    adapter = load_adapter(path)
    assert [p.gated for p in adapter.config.pipes] == [True] and adapter.config.pipes[0].tile[1] == 128
    reports = {}
    for precision in ("fp32", "int8", "int4"):
        onnx_path = tmp_path / f"adapter-{precision}.onnx"
        export_onnx(adapter, onnx_path, precision=precision, ort_nbits=True)  # as `build --target ort-cpu`
        reports[precision] = check_parity(adapter, onnx_path, inputs=held)
    figures = {
        p: {"rel_l2": r.rel_l2, "cosine": r.cosine, "max_abs": r.max_abs, "tokens": r.tokens, "selection": r.selection}
        for p, r in reports.items()
    }
    print(json.dumps(figures))  # the figures docs/precision.md quotes (pytest -s)
    int4 = reports["int4"]
    assert int4.passed, int4.failures  # rel L2 and cosine within the int4 bounds, on real inputs
    assert reports["int8"].passed and reports["fp32"].passed
    assert reports["int8"].rel_l2 < int4.rel_l2  # and the 4-bit tiles are really coarser
