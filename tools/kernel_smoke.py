#!/usr/bin/env python
"""The tile-dispatch kernel on a GPU, small and quick: a few shapes per dtype against the reference.

    python tools/kernel_smoke.py            # exit 0: all agree; 1: a mismatch; 2: no GPU
    compute-sanitizer --tool memcheck python tools/kernel_smoke.py   # also racecheck, synccheck

Meant for the first minutes on a lent GPU (tools/gpu_session.sh runs it plainly and under
compute-sanitizer): every launch is checked (the output starts as NaN, so an element no thread
writes shows), fresh random inputs for every case.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism_deploy.kernel.semantics import random_inputs, tile_dispatch  # noqa: E402
from prism_deploy.kernel.spec import TileDispatchSpec  # noqa: E402

# R, C, tr, tc, top_k, in_dim, out_dim, T: padding rows/columns, top_k 1 and R*C, wide tiles,
# two token chunks, the square benchmark pipe's layout
CASES = [
    (3, 4, 10, 10, 5, 37, 29, 7),
    (2, 3, 7, 300, 1, 850, 13, 33),
    (4, 2, 5, 40, 8, 70, 20, 5),
    (2, 2, 8, 2100, 2, 4000, 16, 3),
    (4, 8, 16, 64, 3, 500, 60, 300),
    (16, 32, 256, 128, 154, 4096, 4096, 1),
]
DTYPES = [("float32", "float32"), ("float16", "float16"), ("float16", "int8"), ("float32", "int8")]
TOL = {"float32": 1e-5, "float16": 2e-3}


def main() -> int:
    try:
        import torch
    except ImportError:
        print("error: torch is needed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    from prism_deploy.kernel.launch import TileDispatchLauncher

    rng = np.random.default_rng()
    dev = torch.device("cuda")
    failures = 0
    print(f"{'case':34} {'hidden':8} {'tiles':8} {'rel L2':>9}  ok")
    for R, C, tr, tc, k, in_dim, out_dim, T in CASES:
        for hidden, tiles_dtype in DTYPES:
            spec = TileDispatchSpec(R, C, tr, tc, k, 1.3, out_dim, hidden, tiles_dtype)
            x, s, tiles, scales = random_inputs(rng, T, in_dim, R, C, tr, tc, tiles_dtype, hidden)
            out = torch.full((T, out_dim), float("nan"), dtype=getattr(torch, hidden), device=dev)
            q = torch.ones(1, device=dev) if scales is None else torch.from_numpy(scales).to(dev)
            TileDispatchLauncher(spec)(
                torch.from_numpy(x).to(dev),
                torch.from_numpy(s).to(dev),
                torch.from_numpy(tiles).to(dev),
                q,
                out,
                torch.cuda.current_stream().cuda_stream,
            )
            torch.cuda.synchronize()
            got = out.float().cpu().numpy()
            ref = tile_dispatch(x.astype(np.float32), s, tiles, scales, **spec.attributes())
            err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref)) if not np.isnan(got).any() else float("nan")
            ok = err < TOL[hidden]
            failures += not ok
            name = f"{R}x{C} of {tr}x{tc} top{k} {in_dim}->{out_dim} T={T}"
            print(f"{name:34} {hidden:8} {tiles_dtype:8} {err:>9.2e}  {'yes' if ok else 'NO'}")
    print(f"{failures} mismatches" if failures else "all cases agree with the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
