"""The CUDA kernel on a real GPU against the reference (issue 5, section 4): random shapes with
padding, top_k = 1 and = R*C, T = 1..256, float32 / float16 / int8 tiles; bit-identical reruns;
batch invariance; hard gates; agreement with the same source run on the CPU. Skips where torch
sees no CUDA GPU (this has NOT run yet: no GPU was lent while it was written)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU visible to torch"),
]

from prism_deploy.kernel.host import compiler, run_on_host  # noqa: E402
from prism_deploy.kernel.launch import tile_dispatch_torch  # noqa: E402
from prism_deploy.kernel.semantics import random_inputs, tile_dispatch  # noqa: E402
from prism_deploy.kernel.spec import TileDispatchSpec  # noqa: E402

# relative L2 bounds against the float32 reference: float32 I/O 1e-5; float16 I/O rounds the
# output (2^-11) and the input, so 2e-3, as the fp16 graphs of issue 3.
TOL = {"float32": 1e-5, "float16": 2e-3}
# against the same source on the CPU: expf's last bits (float32), one float16 ulp (float16 output)
HOST_TOL = {"float32": 1e-6, "float16": 1e-3}
CASES = [
    # R, C, tr, tc, top_k, in_dim, out_dim
    (3, 4, 10, 10, 5, 37, 29),
    (2, 3, 7, 300, 1, 850, 13),
    (4, 2, 5, 40, 8, 70, 20),
    (1, 5, 3, 13, 5, 40, 3),
    (16, 32, 256, 128, 154, 4096, 4096),
    (2, 2, 64, 2100, 2, 4000, 100),
]


def _inputs(case, T, tile_dtype, seed=0):
    R, C, tr, tc, k, in_dim, out_dim = case
    return random_inputs(np.random.default_rng(seed), T, in_dim, R, C, tr, tc, tile_dtype)


def _run(spec, x, s, tiles, scales):
    dev = torch.device("cuda")
    hd = getattr(torch, spec.hidden_dtype)
    out = tile_dispatch_torch(
        torch.from_numpy(x).to(dev, hd),
        torch.from_numpy(s).to(dev),
        torch.from_numpy(tiles).to(dev),
        None if scales is None else torch.from_numpy(scales).to(dev),
        spec,
    )
    torch.cuda.synchronize()
    return out.float().cpu().numpy()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T", [1, 7, 33, 256])
@pytest.mark.parametrize(
    "hidden_dtype,tile_dtype",
    [("float32", "float32"), ("float16", "float16"), ("float16", "int8"), ("float32", "int8")],
)
def test_kernel_matches_reference(case, T, hidden_dtype, tile_dtype):
    R, C, tr, tc, k, in_dim, out_dim = case
    spec = TileDispatchSpec(R, C, tr, tc, k, 1.3, out_dim, hidden_dtype, tile_dtype)
    x, s, tiles, scales = _inputs(case, T, tile_dtype)
    if hidden_dtype == "float16":
        x = x.astype(np.float16).astype(np.float32)  # the reference sees what the kernel sees
    y = _run(spec, x, s, tiles, scales)
    ref = tile_dispatch(x, s, tiles, scales, R=R, C=C, tr=tr, tc=tc, top_k=k, gate_scale=1.3, out_dim=out_dim)
    assert np.linalg.norm(y - ref) <= TOL[hidden_dtype] * np.linalg.norm(ref)
    if compiler() is not None and T <= 33 and R * C * tr * tc < 1e6:
        # the same source run on the CPU (prism_deploy.kernel.host): the same arithmetic in the
        # same order, up to expf's last bits (CUDA within 2 ulp, glibc within 1)
        xin = x.astype(hidden_dtype)
        host = run_on_host(spec, xin, s, tiles, scales).astype(np.float32)
        np.testing.assert_allclose(y, host, rtol=HOST_TOL[hidden_dtype], atol=1e-6)


@pytest.mark.parametrize("tile_dtype", ["float16", "int8"])
def test_bit_identical_reruns_and_batch_invariance(tile_dtype):
    case = (16, 32, 256, 128, 154, 4096, 4096)
    spec = TileDispatchSpec(*case[:5], 1.0, case[6], "float16", tile_dtype)
    x, s, tiles, scales = _inputs(case, 64, tile_dtype, seed=3)
    a = _run(spec, x, s, tiles, scales)
    b = _run(spec, x, s, tiles, scales)
    np.testing.assert_array_equal(a, b)
    for i in (0, 31, 63):
        np.testing.assert_array_equal(_run(spec, x[i : i + 1], s[i : i + 1], tiles, scales)[0], a[i])


def test_hard_gates():
    case = (2, 4, 16, 16, 3, 60, 30)
    spec = TileDispatchSpec(*case[:5], 0.5, case[6], "float32", "float32")
    x, _, tiles, scales = _inputs(case, 4, "float32")
    s = np.array(
        [
            [-3, -1, -1, -2, -1, -5, -1, -7],
            [0.0, -0.0, 0, -0.0, 1, 0, -0.0, -1],
            [2.0] * 8,
            [3e38, -3e38, 3, 3e38, 0, -3, 1e-38, -1e-38],
        ],
        np.float32,
    )
    y = _run(spec, x, s, tiles, scales)
    ref = tile_dispatch(x, s, tiles, scales, R=2, C=4, tr=16, tc=16, top_k=3, gate_scale=0.5, out_dim=30)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
