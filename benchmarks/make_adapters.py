"""Write the benchmark adapters, deterministically, so that results can be reproduced.

    python benchmarks/make_adapters.py [-o build/bench-adapters] [big-dense] [big-3pipe]

The third benchmarked adapter, the shipped example, is committed:
``examples/demo-adapter.safetensors`` (``tools/make_example.py``).

- ``big-dense.safetensors``: 4096 -> 4096, one ungated pipe, 16x32 grid of 256x128 tiles
  (512 workers, 64 MiB of fp32 tiles).
- ``big-3pipe.safetensors``: 4096 -> 4096, three gated pipes of that grid, top_k 154 each,
  weighted combine (about 216 MiB).

Weights come from ``prism_deploy.reference.random_adapter`` with fixed seeds (torch's CPU
generator), so the same torch version writes the same tensors, and the adapter writer's
canonical header makes the file bytes the same too. The script prints the file's sha256 and
a content digest (config plus every tensor's bytes, by name) that results files record as
``adapter.sha256`` and ``adapter.content_sha256``. These files are not committed
(the 4096 ones are large); ``build/`` is ignored by git.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prism_deploy.bench import adapter_content_digest
from prism_deploy.format import AdapterConfig, PipeSpec, file_sha256
from prism_deploy.reference import random_adapter

GRID_4096 = (16, 32)
TILE_4096 = (256, 128)


def big_dense_config() -> AdapterConfig:
    return AdapterConfig(4096, 4096, (PipeSpec("dense", GRID_4096, TILE_4096),))


def big_3pipe_config() -> AdapterConfig:
    pipes = tuple(PipeSpec(f"pipe{i + 1}", GRID_4096, TILE_4096, top_k=154) for i in range(3))
    return AdapterConfig(4096, 4096, pipes, combine="weighted")


ADAPTERS = {
    "big-dense": (big_dense_config, 1),
    "big-3pipe": (big_3pipe_config, 2),
}


def content_digest(path: Path) -> str:
    from prism_deploy.reference import load_adapter

    return adapter_content_digest(load_adapter(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", default="build/bench-adapters", help="output folder")
    parser.add_argument("names", nargs="*", default=list(ADAPTERS), help=f"which ({', '.join(ADAPTERS)})")
    args = parser.parse_args(argv)
    out = Path(args.out)
    for name in args.names:
        if name not in ADAPTERS:
            print(f"error: unknown adapter {name!r}; choose from {', '.join(ADAPTERS)}", file=sys.stderr)
            return 2
        make, seed = ADAPTERS[name]
        path = out / f"{name}.safetensors"
        random_adapter(make(), seed=seed).save(path)
        print(f"{path}  content {content_digest(path)}  file sha256 {file_sha256(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
