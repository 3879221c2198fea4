"""Matrix files (activations, targets, calibration) and atomic writes."""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

from prism_deploy.core.data import MatrixFile, load_matrix
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.fsutil import atomic_output, write_text_atomic
from prism_deploy.core.onnx_io import save_model


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    return rng.standard_normal((10, 3)).astype(np.float32), rng.standard_normal((10, 2)).astype(np.float32)


def test_formats_agree_and_chunks_concatenate(tmp_path, arrays):
    x, z = arrays
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "xz.npz", X=x, Z=z)
    save_file({"X": torch.from_numpy(x), "Z": torch.from_numpy(z)}, str(tmp_path / "xz.safetensors"))
    for arg in ("x.npy", "xz.npz:X", "xz.safetensors:X"):
        m = MatrixFile(tmp_path / arg if ":" not in arg else f"{tmp_path}/{arg}")
        assert m.shape == (10, 3)
        np.testing.assert_array_equal(m.read(), x)
        np.testing.assert_array_equal(np.concatenate(list(m.iter_chunks(4))), x)
    # a pairs file (as written by `collect`) gives X or Z by preference when none is named
    np.testing.assert_array_equal(MatrixFile(tmp_path / "xz.safetensors", prefer="Z").read(), z)
    np.testing.assert_array_equal(load_matrix(tmp_path / "xz.npz"), x)


def test_bad_matrix_inputs_are_clean_errors(tmp_path, arrays):
    x, z = arrays
    np.savez(tmp_path / "two.npz", A=x, B=z)
    with pytest.raises(PrismInputError, match="several arrays"):
        MatrixFile(tmp_path / "two.npz")
    with pytest.raises(PrismInputError, match="no array named 'C'"):
        MatrixFile(f"{tmp_path}/two.npz:C")
    bad = x.copy()
    bad[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(PrismInputError, match="NaN"):
        MatrixFile(tmp_path / "nan.npy").read()
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(PrismInputError, match="unknown file type"):
        MatrixFile(tmp_path / "x.csv")
    np.save(tmp_path / "v.npy", np.zeros(4, np.float32))
    with pytest.raises(PrismInputError, match="2-D"):
        MatrixFile(tmp_path / "v.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(PrismInputError, match="cannot read"):
        MatrixFile(tmp_path / "junk.npy")


def _npz_member(path, name: str, header: dict, payload_bytes: int) -> None:
    """An .npz whose member declares ``header`` and holds ``payload_bytes`` zero bytes, deflated."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open(f"{name}.npy", "w", force_zip64=True) as f:
            head = io.BytesIO()
            np.lib.format.write_array_header_1_0(head, header)
            f.write(head.getvalue())
            block = bytes(1 << 24)
            for start in range(0, payload_bytes, len(block)):
                f.write(block[: min(len(block), payload_bytes - start)])


def test_a_compressed_npz_is_read_in_bounded_memory(tmp_path):
    """Issue 17: a 2 MB .npz bomb took 2.3 GB just to read its shape; now the shape comes from
    the member's header and rows are decompressed as they are read."""
    import subprocess
    import sys

    bomb = tmp_path / "bomb.npz"
    rows, cols = 100_000, 1024  # 400 MB of float32 zeros in well under 1 MB
    _npz_member(bomb, "x", {"descr": "<f4", "fortran_order": False, "shape": (rows, cols)}, rows * cols * 4)
    assert bomb.stat().st_size < (1 << 20)
    # VmHWM is the process's own peak (getrusage's maxrss carries the parent's over fork)
    code = f"""
from prism_deploy.core.data import MatrixFile
m = MatrixFile({str(bomb)!r})
assert m.shape == ({rows}, {cols})
total = sum(float(c.sum()) for c in m.iter_chunks(4096))
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(total, peak // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    total, peak_mib = out.stdout.split()
    assert float(total) == 0.0 and int(peak_mib) < 250  # the array alone would be 400 MB


def test_npz_members_are_checked_before_they_are_read(tmp_path):
    lying = tmp_path / "lying.npz"  # declares 1e6 x 1000 float32, holds 400 bytes
    _npz_member(lying, "x", {"descr": "<f4", "fortran_order": False, "shape": (1_000_000, 1000)}, 400)
    with pytest.raises(PrismInputError, match="declares .* bytes, the archive holds"):
        MatrixFile(lying)
    np.savez(tmp_path / "objects.npz", x=np.array([[object()]], dtype=object))
    with pytest.raises(PrismInputError, match="Python objects"):
        MatrixFile(tmp_path / "objects.npz")
    np.savez(tmp_path / "fortran.npz", x=np.asfortranarray(np.ones((3, 4), np.float32)))
    with pytest.raises(PrismInputError, match="Fortran order"):
        MatrixFile(tmp_path / "fortran.npz")
    np.savez_compressed(tmp_path / "ok.npz", x=np.arange(12, dtype=np.float32).reshape(4, 3))
    m = MatrixFile(tmp_path / "ok.npz")
    assert m.rows_range(2, 4).tolist() == [[6, 7, 8], [9, 10, 11]] and m.rows_range(0, 1).tolist() == [[0, 1, 2]]


def test_atomic_output_keeps_old_content_on_failure_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_output_has_the_mode_of_a_plain_file(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.txt")


def test_a_folder_is_not_an_output_file(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(PrismInputError, match="out: is a folder"):
        write_text_atomic(tmp_path / "out", "x")
    with pytest.raises(PrismInputError, match="out: is a folder"):
        save_model(onnx.ModelProto(), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any((tmp_path / "out").iterdir())


def test_save_model_leaves_only_its_files_even_when_external(tmp_path):
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [w],
    )
    written = save_model(helper.make_model(graph), tmp_path / "m.onnx", external=True)
    assert [p.name for p in written] == ["m.onnx", "m.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), np.ones((64, 64), np.float32))
