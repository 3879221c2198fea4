"""Large weights a block at a time: the adapter file mapped and checked in blocks, the tile
re-layout and quantization by row-blocks, and initializers streamed into the saved file.

Blocks here are a few bytes (``BLOCK_BYTES`` patched), so small adapters cross every block
boundary the multi-GB ones do: tile edges, crops, pipes folded together. The streamed files
must equal the whole in-memory model bit for bit (tests/lower/test_large.py measures memory).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from prism_deploy.core import blocks, onnx_io
from prism_deploy.core.blocks import DeferredTensor
from prism_deploy.core.errors import AdapterFormatError, PrismInputError
from prism_deploy.core.tiles import dense_from_tiles, dense_rows, quantize_rows, quantize_with_scales, row_scales
from prism_deploy.format import AdapterConfig, PipeSpec, read_adapter_file, validate_tensors, write_adapter_file
from prism_deploy.lower import build_model, export_onnx
from prism_deploy.reference import random_adapter
from tests.lower_helpers import ort_run

BF16 = np.dtype(ml_dtypes.bfloat16)

# folded ungated pipes (crossing tile edges and a crop), gated pipes of both forms, weights
MIXED = AdapterConfig(
    50,
    37,
    (
        PipeSpec("dense", (3, 2), (13, 26), None),
        PipeSpec("dense two", (2, 3), (19, 17), None),
        PipeSpec("routed", (4, 3), (10, 20), 5, 1.5),
        PipeSpec("coarse", (2, 2), (20, 25), 2),
    ),
    "weighted",
)
# one ungated pipe alone: the dense weight itself, not a fold
SINGLE = AdapterConfig(30, 20, (PipeSpec("u", (3, 4), (7, 8), None),))


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    """The adapters written to files, read back (mapped) for the streamed exports."""
    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for name, cfg in (("mixed", MIXED), ("single", SINGLE)):
        a = random_adapter(cfg, seed=3)
        paths[name] = root / f"{name}.safetensors"
        write_adapter_file(paths[name], a.config, a.tensors())
    return paths


@pytest.fixture
def tiny_blocks(monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 50)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the pieces ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid,tile,crop",
    [((3, 4), (7, 8), (20, 30)), ((4, 3), (6, 5), (19, 13)), ((2, 2), (5, 3), (10, 6)), ((1, 1), (4, 4), (1, 1))],
)
@pytest.mark.parametrize(
    "dtype,out", [(np.float32, np.float32), (np.float16, np.float32), (BF16, np.float16), (np.float32, np.float16)]
)
def test_dense_rows_are_the_dense_matrix_rows(grid, tile, crop, dtype, out):
    (R, C), (tr, tc) = grid, tile
    tiles = np.random.default_rng(0).standard_normal((R * C, tr, tc)).astype(dtype)
    whole = np.ascontiguousarray(dense_from_tiles(tiles, grid, tile, crop=crop, transpose=True), dtype=out)
    for start in range(crop[1]):
        for stop in range(start + 1, crop[1] + 1):
            got = dense_rows(tiles, grid, tile, start, stop, crop=crop, dtype=out)
            assert got.dtype == out and got.flags.c_contiguous
            assert got.tobytes() == whole[start:stop].tobytes(), (start, stop)
    # without a crop: the whole padded matrix
    assert (
        dense_rows(tiles, grid, tile, 0, C * tc).tobytes()
        == np.ascontiguousarray(dense_from_tiles(tiles, grid, tile, transpose=True)).tobytes()
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
def test_quantization_in_blocks_is_quantize_rows(dtype, tiny_blocks):
    tiles = (np.random.default_rng(1).standard_normal((6, 5, 7)) * 3).astype(dtype)
    tiles[2, 1] = 0  # a row of zeros: scale 1
    with pytest.MonkeyPatch.context() as m:
        m.setattr(blocks, "BLOCK_BYTES", 64 << 20)
        q, s = quantize_rows(tiles)  # one block: the whole-array computation
    assert (quantize_rows(tiles)[0] == q).all() and (quantize_rows(tiles)[1] == s).all()
    rows = tiles.reshape(-1, 7)
    scales = row_scales(rows)
    assert scales.tobytes() == s.reshape(-1).tobytes() and s[2, 1] == 1
    for a, b in ((0, 30), (3, 9), (29, 30)):
        assert quantize_with_scales(rows[a:b], scales[a:b]).tobytes() == q.reshape(-1, 7)[a:b].tobytes()


def test_deferred_tensor_blocks_and_checks(tiny_blocks):
    values = np.arange(24, dtype=np.float32).reshape(6, 4)
    d = DeferredTensor((6, 4), np.dtype(np.float32), lambda a, b: values[a:b].copy())
    got = list(d.blocks())
    assert len(got) == 2 and all(len(g) == 3 for g in got)  # 50 bytes: 3 rows of 16
    assert d.nbytes == 96 and (d.materialize() == values).all()
    wrong = DeferredTensor((6, 4), np.dtype(np.float16), lambda a, b: values[a:b].copy())
    with pytest.raises(ValueError, match="rows gave float32"):
        wrong.materialize()
    strided = DeferredTensor((6, 2), np.dtype(np.float32), lambda a, b: values[a:b, ::2])
    with pytest.raises(ValueError, match="not contiguous"):
        strided.materialize()


# ---- reading -----------------------------------------------------------------------------------


def test_read_maps_the_file_copy_on_write(tmp_path):
    a = random_adapter(MIXED, seed=3)
    path = tmp_path / "a.safetensors"
    write_adapter_file(path, a.config, a.tensors())
    before = _sha(path)
    data = read_adapter_file(path)
    for name, t in a.arrays().tensors.items():
        got = data.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape and got.tobytes() == np.ascontiguousarray(t).tobytes()
    tiles = data.tiles(0)
    base = tiles
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)  # mapped, not read
    assert tiles.flags.writeable
    tiles[...] = 7.0  # private: the file never changes
    assert _sha(path) == before
    assert (read_adapter_file(path).tiles(0) == a.arrays().tiles(0)).all()


def test_read_bfloat16_file(tmp_path):
    a = random_adapter(SINGLE, seed=1)
    tensors = {k: np.asarray(v, np.float32).astype(BF16) for k, v in a.arrays().tensors.items()}
    write_adapter_file(tmp_path / "b.safetensors", a.config, tensors)
    got = read_adapter_file(tmp_path / "b.safetensors")
    assert got.tiles(0).dtype == BF16 and got.tiles(0).tobytes() == tensors["pipes.0.tiles"].tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
def test_nan_and_inf_are_counted_across_blocks(dtype, tiny_blocks, tmp_path):
    from safetensors.numpy import save_file

    from prism_deploy.format.adapter_config import FORMAT_NAME, FORMAT_VERSION

    a = random_adapter(SINGLE, seed=1)
    tiles = np.asarray(a.arrays().tiles(0), np.float32)
    tiles[0, 0, 0], tiles[5, 3, 2], tiles[11, 6, 7] = np.nan, np.inf, -np.inf  # first, middle and last blocks
    tiles = tiles.astype(dtype)
    with pytest.raises(AdapterFormatError, match=r"'pipes\.0\.tiles': 3 NaN or Inf"):
        validate_tensors(a.config, {"pipes.0.tiles": tiles})
    if dtype == BF16:
        return
    # a file another tool wrote (safetensors' own writer: no checks), mapped and refused
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": a.config.dumps()}
    save_file({"pipes.0.tiles": tiles}, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(AdapterFormatError, match=r"bad\.safetensors: tensor 'pipes\.0\.tiles': 3 NaN or Inf"):
        read_adapter_file(tmp_path / "bad.safetensors")


# ---- exports ------------------------------------------------------------------------------------


PRECISIONS = ["fp32", "fp16", "int8"]


@pytest.mark.parametrize("name", ["mixed", "single"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_streamed_export_is_the_in_memory_model(adapter_files, name, precision, tmp_path, monkeypatch):
    """One file: the bytes of the whole model serialized at once."""
    data = read_adapter_file(adapter_files[name])
    whole = build_model(data, precision=precision).SerializeToString()  # 64 MiB blocks: each tensor whole
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 50)
    res = export_onnx(data, tmp_path / "m.onnx", precision=precision)
    assert res.paths == [str(tmp_path / "m.onnx")]
    assert (tmp_path / "m.onnx").read_bytes() == whole
    # and the in-memory model built in tiny blocks is the same model
    assert build_model(data, precision=precision).SerializeToString() == whole


def test_in_memory_weights_are_the_tile_layout(adapter_files, tiny_blocks):
    """Independent of the block code: the dense weight is dense_from_tiles, int8 tiles are quantize_rows."""
    data = read_adapter_file(adapter_files["single"])
    inits = {t.name: numpy_helper.to_array(t) for t in build_model(data, precision="fp16").graph.initializer}
    expect = np.ascontiguousarray(
        dense_from_tiles(data.tiles(0), (3, 4), (7, 8), crop=(20, 30), transpose=True), dtype=np.float16
    )
    assert inits["u/weight"].tobytes() == expect.tobytes()
    inits = {t.name: numpy_helper.to_array(t) for t in build_model(data, precision="int8").graph.initializer}
    q, s = quantize_rows(data.tiles(0))
    assert inits["u/tiles"].tobytes() == q.tobytes() and inits["u/tiles/scales"].tobytes() == s.tobytes()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_streamed_external_data_is_the_in_memory_model(adapter_files, precision, tmp_path, monkeypatch):
    """Two files (external data forced): every tensor as in the whole model, large ones aligned,
    the data file of the umask's mode, and the graph runs the same."""
    data = read_adapter_file(adapter_files["mixed"])
    whole = build_model(data, precision=precision)
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 50)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(onnx_io, "ALIGN_MIN_BYTES", 2000)
    monkeypatch.setattr(onnx_io, "ALIGNMENT", 4096)
    old = os.umask(0o027)
    try:
        res = export_onnx(data, tmp_path / "m.onnx", precision=precision)
    finally:
        os.umask(old)
    assert res.paths == [str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx.data")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    for p in res.paths:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o640, p
    refs = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    external = [t for t in refs.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) == 0 for t in external)
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "m.onnx.data"
        assert int(info["length"]) >= 1024
        if int(info["length"]) >= 2000:
            assert int(info["offset"]) % 4096 == 0, t.name
    inline = [t for t in refs.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) < 1024 for t in inline)
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    for t in loaded.graph.initializer:
        t.ClearField("data_location")
        del t.external_data[:]
    assert loaded.SerializeToString() == whole.SerializeToString()
    x = np.random.default_rng(0).standard_normal((2, 3, 50)).astype(np.float32)
    from prism_deploy.core.ort_session import make_session

    got = make_session(tmp_path / "m.onnx", "cpu").run(["adapted"], {"hidden": x})[0]
    assert np.array_equal(got, ort_run(whole, x))


def test_a_failure_while_streaming_leaves_no_file(tmp_path, tiny_blocks):
    """The folded fp16 weight is range-checked as it is written: the error comes mid-file."""
    cfg = AdapterConfig(8, 8, (PipeSpec("a", (2, 2), (4, 4), None), PipeSpec("b", (2, 2), (4, 4), None)))
    a = random_adapter(cfg, seed=0)
    for p in a.pipe_list():
        p.tiles.data[3, 2, 1] = 40000.0  # each fits float16; their sum does not
    for external in (False, True):
        with pytest.MonkeyPatch.context() as m:
            if external:
                m.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 0)
            with pytest.raises(PrismInputError, match=r"folded weight of pipes \[0, 1\].*float16 range"):
                export_onnx(a, tmp_path / "m.onnx", precision="fp16")
        assert list(tmp_path.iterdir()) == []


def test_save_model_refuses_deferred_tensors_it_cannot_place(tmp_path):
    model = build_model(random_adapter(SINGLE, seed=0))
    stray = DeferredTensor((2, 2), np.dtype(np.float32), lambda a, b: np.zeros((b - a, 2), np.float32))
    with pytest.raises(ValueError, match="not among the graph's initializers"):
        onnx_io.save_model(model, tmp_path / "m.onnx", deferred={"nowhere": stray})
    assert list(tmp_path.iterdir()) == []
