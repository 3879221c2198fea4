"""llama.cpp beside a last model's folders in ``bench --model --gguf`` (prism_deploy/bench/llamacpp.py).

- A GGUF file's metadata is read and checked against the folders' dims: a file of another model,
  or a quantized one, is refused (exit 2, one line naming it) before anything is timed. These
  checks write their GGUF files with the ``gguf`` package, no llama.cpp needed for the reading.
- On the tiny Llama converted by llama.cpp's own converter (``LLAMA_CPP_SRC``, else the
  llama-cpp-python sdist unpacked under /tmp/llama as docs/real-models.md does it), the peer runs
  at the folder precisions' types, on the prompt's token ids, and its greedy tokens are
  transformers'. Skipped, with the reason, without ``llama_cpp``, the converter or
  ``sentencepiece`` (CI has none of them).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from prism_deploy.cli.main import main
from prism_deploy.core.errors import PrismInputError


def _write_gguf(path: Path, *, hidden: int, layers: int, vocab: int, quantized: bool = False) -> Path:
    """A GGUF file with a Llama's metadata and one matrix (F32, or Q8_0 bytes)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_vocab_size(vocab)
    if quantized:  # Q8_0: 32 values a block in 34 bytes (a float16 scale, 32 int8)
        raw = np.zeros((hidden, vocab // 32 * 34), dtype=np.uint8)
        writer.add_tensor("token_embd.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor("token_embd.weight", np.zeros((vocab, hidden), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_metadata_is_checked_against_the_folders(tmp_path):
    from prism_deploy.bench.llamacpp import check_gguf
    from prism_deploy.models.gguf import model_shape

    dims = {"hidden": 64, "layers": 2, "vocab": 320, "kv_heads": 2, "head_dim": 16}
    same = _write_gguf(tmp_path / "same.gguf", hidden=64, layers=2, vocab=320)
    assert model_shape(same) == {"architecture": "llama", "hidden": 64, "layers": 2, "vocab": 320, "weight_type": "F32"}
    assert check_gguf(same, dims)["weight_type"] == "F32"
    other = _write_gguf(tmp_path / "other.gguf", hidden=64, layers=3, vocab=288)
    with pytest.raises(PrismInputError, match=r"other\.gguf: not the folders' model: its vocab 288 .*layers 3"):
        check_gguf(other, dims)
    quantized = _write_gguf(tmp_path / "q8.gguf", hidden=64, layers=2, vocab=320, quantized=True)
    assert model_shape(quantized)["weight_type"] == "Q8_0"
    with pytest.raises(PrismInputError, match=r"q8\.gguf: its weights are Q8_0, not a float type"):
        check_gguf(quantized, dims)
    with pytest.raises(PrismInputError, match="not a readable GGUF file"):
        model_shape(Path(__file__))


def test_a_float_file_stands_for_fp32_and_fp16_as_it_is(tmp_path):
    from prism_deploy.bench.llamacpp import gguf_for

    given = tmp_path / "model-f16.gguf"
    assert gguf_for("fp32", given, "F16", tmp_path, threads=1) == ("F16", given)  # named "llama.cpp F16"
    assert gguf_for("fp16", given, "F16", tmp_path, threads=1) == ("F16", given)
    assert gguf_for("fp32", given, "BF16", tmp_path, threads=1) == ("BF16", given)
    assert list(tmp_path.iterdir()) == []  # nothing quantized


def test_bench_refuses_a_missing_or_unused_gguf_file(zoo, tmp_path, capsys):
    missing = tmp_path / "none.gguf"
    assert main(["bench", "--model", str(zoo["B"]), "--gguf", str(missing), "--no-eager"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {missing}: no such file (--gguf: a float GGUF file of the folders' model)"
    )
    given = _write_gguf(tmp_path / "b.gguf", hidden=96, layers=2, vocab=320)
    assert main(["bench", "--model", str(zoo["B"]), "--gguf", str(given), "--no-peers", "--no-eager"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --gguf {given}: the llama.cpp peer's file, but with --no-peers it is not used"]


def test_bench_refuses_a_gguf_of_another_model(zoo, tmp_path, capsys):
    pytest.importorskip("llama_cpp", reason="the GGUF file is checked where llama.cpp can run it")
    other = _write_gguf(tmp_path / "other.gguf", hidden=64, layers=2, vocab=300)  # the Llama's, not B's Qwen2
    code = main(["bench", "--model", str(zoo["B"]), "--gguf", str(other), "--no-eager", "--repeat", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and str(other) in err[0] and "hidden 64 (the folders' 96)" in err[0]
    # a first model's folders get no peers: the file is refused rather than ignored
    assert main(["bench", "--model", str(zoo["A"]), "--gguf", str(other), "--no-eager", "--repeat", "1"]) == 2
    assert "beside a last model" in capsys.readouterr().err


def _converter() -> Path | None:
    found = [os.environ.get("LLAMA_CPP_SRC", "")] + sorted(glob.glob("/tmp/llama/llama_cpp_python-*/vendor/llama.cpp"))
    return next((Path(p) for p in found if p and Path(p, "convert_hf_to_gguf.py").is_file()), None)


@pytest.fixture(scope="module")
def llama_gguf(zoo, tmp_path_factory):
    """The tiny Llama as an F32 GGUF (llama.cpp's converter) and as a last-model folder."""
    for module in ("llama_cpp", "sentencepiece"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (llama.cpp's peer and its converter need it)")
    src = _converter()
    if src is None:
        pytest.skip("no llama.cpp converter: set LLAMA_CPP_SRC to the llama-cpp-python sdist's vendor/llama.cpp")
    from prism_deploy.bench.llamacpp import convert_hf_to_gguf
    from prism_deploy.models.lm_export import export_model
    from tests.model_helpers import sentencepiece_view

    root = tmp_path_factory.mktemp("llamacpp")
    gguf = root / "llama-f32.gguf"
    convert_hf_to_gguf(src, sentencepiece_view(zoo["llama"], root / "view"), gguf)
    folders = {}
    for precision in ("fp32", "int8"):
        folders[precision] = root / f"llama_last_{precision}"
        export_model(zoo["llama"], "last", folders[precision], max_seq=32, precision=precision)
    return gguf, folders


def test_llama_cpp_runs_at_each_precisions_type_with_its_memory(llama_gguf, zoo, tmp_path):
    from prism_deploy.bench.models import run_model_bench

    gguf, folders = llama_gguf
    results = run_model_bench(
        [folders["fp32"], folders["int8"]],
        threads=1,
        prompt=6,
        new_tokens=4,
        repeat=2,
        warmup=0,
        eager=False,
        hf_dir=str(zoo["llama"]),
        gguf=gguf,
        memory=True,
    )
    cases = {c["name"]: c for c in results["cases"]}
    for case in cases.values():  # every case, the peers' too, loaded again in a process of its own
        assert case["memory"]["net_peak_bytes"] > 0, (case["name"], case["memory"])
    f32, q8 = cases["llama.cpp F32"], cases["llama.cpp Q8_0"]
    assert (f32["precision"], f32["path"], f32["made_from"]) == ("fp32", str(gguf), None)
    assert (q8["precision"], q8["gguf_type"], q8["made_from"]) == ("int8", "Q8_0", str(gguf))
    for case in (f32, q8):  # timed as the folders: one prefill, one sample per decode step, each repetition
        assert case["backend"] == "llama.cpp" and case["prefill"]["samples"] == 2 and case["decode"]["samples"] == 8
        assert case["floor"]["weights_bytes"] == cases[f"llama_last_{case['precision']}"]["weight_bytes_per_token"]
    assert "llama.cpp" not in results["peers_skipped"]


def test_llama_cpp_peer_decodes_transformers_greedy_tokens(llama_gguf, zoo):
    """The converted file is the model: on the same prompt ids its greedy tokens are transformers'."""
    import torch

    from prism_deploy.bench.llamacpp import LlamaCppPeer
    from prism_deploy.models import hf

    gguf, _ = llama_gguf
    ids = np.array([[5, 17, 42, 8, 99, 3]], dtype=np.int64)
    peer = LlamaCppPeer(gguf, "F32", "fp32", threads=1, max_length=12)
    peer.ids = ids
    prefill, decode = peer.generate(np.zeros((1, 6, 64), np.float32), [np.zeros((1, 1, 64), np.float32)] * 5)
    assert prefill > 0 and len(decode) == 5 and len(peer.tokens) == 6
    model = hf.load_causal_lm(str(zoo["llama"]))
    with torch.no_grad():
        want = model.generate(
            torch.from_numpy(ids),
            attention_mask=torch.ones_like(torch.from_numpy(ids)),
            max_new_tokens=6,
            do_sample=False,
        )
    assert peer.tokens == want[0, 6:].tolist()


def test_the_bench_reuses_a_quantized_file_and_refuses_a_folder_of_another_model(llama_gguf, zoo, tmp_path, capsys):
    from prism_deploy.bench.llamacpp import gguf_for

    gguf, _ = llama_gguf
    made = gguf_for("int4", gguf, "F32", tmp_path, threads=1)
    assert made[0] == "Q4_0" and made[1].parent == tmp_path and made[1].name.startswith("llama-f32-")
    assert made[1].name.endswith("-q4_0.gguf") and made[1].stat().st_size < gguf.stat().st_size
    stamp = made[1].stat().st_mtime_ns
    assert gguf_for("int4", gguf, "F32", tmp_path, threads=1) == made and made[1].stat().st_mtime_ns == stamp
    assert gguf_for("fp32", gguf, "F32", tmp_path, threads=1) == ("F32", gguf)
    # the converted Llama beside model B (the Qwen2): refused by the CLI, exit 2, one line
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(gguf, copy)
    capsys.readouterr()  # llama.cpp's quantizer writes its own notes (a type it fell back from)
    assert main(["bench", "--model", str(zoo["B"]), "--gguf", str(copy), "--no-eager", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and str(copy) in captured.err


def test_llama_cpp_is_skipped_without_a_file_and_runs_with_one(monkeypatch):
    from prism_deploy.bench import peers

    real = importlib.util.find_spec
    monkeypatch.setattr(
        peers.importlib.util, "find_spec", lambda name, *a: object() if name == "llama_cpp" else real(name, *a)
    )
    assert "--gguf FILE" in peers.peer_reasons()["llama.cpp"]
    assert peers.peer_reasons("model-f32.gguf")["llama.cpp"] is None
