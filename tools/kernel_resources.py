#!/usr/bin/env python
"""Registers and spills of the tile-dispatch kernel for the benchmark pipes (no GPU needed).

    python tools/kernel_resources.py [--arch sm_90] [--json]

Compiles each variant with NVRTC to a cubin for a real architecture with ptxas verbose and prints
what ptxas reports (plugins/tile_dispatch/README.md quotes the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism_deploy.kernel.nvrtc import ptxas_resources  # noqa: E402
from prism_deploy.kernel.spec import TileDispatchSpec  # noqa: E402

PIPES = {
    "square 4096->4096": (16, 32, 256, 128, 154, 4096),
    "pipe3 4096->128256": (256, 2, 512, 2048, 154, 128256),
}
DTYPES = [("float16", "float16"), ("float16", "int8"), ("float32", "float32"), ("float32", "int8")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for name, (R, C, tr, tc, k, out_dim) in PIPES.items():
        for hidden, tiles in DTYPES:
            res = ptxas_resources(TileDispatchSpec(R, C, tr, tc, k, 1.0, out_dim, hidden, tiles), args.arch)
            rows.append({"pipe": name, "hidden": hidden, "tiles": tiles, **dataclasses.asdict(res)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'pipe':20} {'hidden':8} {'tiles':8} {'arch':6} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9}")
    for r in rows:
        print(
            f"{r['pipe']:20} {r['hidden']:8} {r['tiles']:8} {r['arch']:6} {r['registers']:>5} {r['stack_bytes']:>6} "
            f"{r['spill_store_bytes']:>9} {r['spill_load_bytes']:>9}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
