"""SmolLM2-135M-Instruct (the real set) quantized, measured on held-out real text.

The float ``last.onnx`` is traced once; int8 (round to nearest, the default) and int4 with the
mixed plan (calibrated on the first half of ``pydoc_data.topics``) are quantized from it and
run on 256 tokens of the second half. Floors from the measurement in docs/quantized-models.md
("On a real model"), a little below the measured figures so that a change of ONNX Runtime's
kernels does not trip them, and no looser than the plain int4 figures they improve on.
"""

from __future__ import annotations

import numpy as np
import pytest

from prism_deploy.models import quantize, real
from prism_deploy.models.lm_export import export_model
from tests.conftest import real_model_dir

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from prism_deploy.models.tokenizers import load_tokenizer

    folder = real_model_dir(real.SMOLLM2)
    out = tmp_path_factory.mktemp("smol") / "fp32"
    export_model(folder, "last", out, validate=False)
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    text = "\n\n".join(topics.topics[k] for k in keys[len(keys) // 2 :])
    ids = np.asarray(load_tokenizer(folder)(text)["input_ids"][:256], dtype=np.int64)
    table = np.load(out / "embed_tokens.npy")
    return {"hf": folder, "fp32": out, "ids": ids, "table": table, "ref": _logits(out / "last.onnx", table, ids)}


def _logits(graph, table, ids):
    from prism_deploy.core.ort_session import make_session

    feeds = {"inputs_embeds": table[ids[None]].astype(np.float32), "attention_mask": np.ones((1, len(ids)), np.int64)}
    return make_session(graph, "cpu").run(["logits"], feeds)[0][0]


def _perplexity(logits, ids):
    lg = logits[:-1].astype(np.float64)
    top = lg.max(-1, keepdims=True)
    nll = np.log(np.exp(lg - top).sum(-1)) + top[:, 0] - lg[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def _measure(smol, graph):
    got = _logits(graph, smol["table"], smol["ids"])
    top1 = float((got.argmax(-1) == smol["ref"].argmax(-1)).mean())
    return top1, _perplexity(got, smol["ids"]) / _perplexity(smol["ref"], smol["ids"])


def test_int8_holds_on_real_text(smol, tmp_path):
    quantize.quantize_graph(smol["fp32"] / "last.onnx", tmp_path / "q.onnx", quantize.make_spec("int8"))
    top1, ratio = _measure(smol, tmp_path / "q.onnx")
    # measured on 512 held-out tokens: top-1 0.949, perplexity 1.010x
    assert top1 >= 0.93 and ratio <= 1.03, (top1, ratio)


def test_int4_mixed_plan_beats_plain_int4_on_real_text(smol, tmp_path):
    from prism_deploy.models import hf
    from prism_deploy.models.lm_export import _calibration_feeds

    src = smol["fp32"] / "last.onnx"
    feeds, _ = _calibration_feeds(smol["hf"], hf.load_causal_lm(smol["hf"]), "last", None)
    acts = quantize.layer_inputs(src, feeds)
    plain = quantize.quantize_graph(src, tmp_path / "plain.onnx", quantize.make_spec("int4"))
    mixed = quantize.quantize_graph(
        src, tmp_path / "mixed.onnx", quantize.make_spec("int4", mixed=True), activations=acts
    )
    bits = list(mixed["plan"].values())
    assert bits.count(4) > len(bits) // 2 and 8 in bits  # mostly int4; the sensitive layers at int8
    top1_plain, ratio_plain = _measure(smol, tmp_path / "plain.onnx")
    top1, ratio = _measure(smol, tmp_path / "mixed.onnx")
    assert top1 > top1_plain and ratio < ratio_plain, (top1, top1_plain, ratio, ratio_plain)
    assert top1 >= MIXED_TOP1 and ratio <= MIXED_PPL_RATIO, (top1, ratio)
    assert mixed["quantized_bytes"] < 0.5 * plain["quantized_bytes_float"]


# measured on 512 held-out tokens (docs/quantized-models.md): the default plan (max error 0.1)
# top-1 0.686, perplexity 1.336x; plain int4 0.629, 1.411x. Below issue 21's int4 targets
# (0.85, 1.10x): the docs give the measured cause.
MIXED_TOP1 = 0.62  # on 256 tokens (this test) a window varies a few points from the 512-token figure
MIXED_PPL_RATIO = 1.45
