"""Write the shipped example adapter, ``examples/demo-adapter.safetensors``.

A synthetic adapter (random weights, not trained) that shows every feature of format v1 in
under 1 MB: three pipes (ungated, gated with many small tiles, gated with a few large tiles),
the weighted combine, and free-form source/target metadata. Deterministic: running this
script again gives the same tensors, and tests/test_example.py checks the committed file
against it.

    python tools/make_example.py [-o examples/demo-adapter.safetensors]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prism_deploy import AdapterConfig, PipeSpec, PrismAdapter
from prism_deploy.reference import random_adapter

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "examples" / "demo-adapter.safetensors"
SEED = 2024


def demo_config() -> AdapterConfig:
    return AdapterConfig(
        in_dim=256,
        out_dim=160,
        pipes=(
            PipeSpec("dense", grid=(4, 4), tile=(40, 64), top_k=None),
            PipeSpec("routed", grid=(8, 8), tile=(20, 32), top_k=16, gate_scale=1.0),
            PipeSpec("coarse", grid=(2, 4), tile=(80, 64), top_k=3),
        ),
        combine="weighted",
        source_model={"model": "synthetic", "hidden_size": 256, "note": "demo: random weights, not trained"},
        target_model={"model": "synthetic", "embedding_size": 160, "note": "demo: random weights, not trained"},
    )


def demo_adapter() -> PrismAdapter:
    return random_adapter(demo_config(), seed=SEED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    demo_adapter().save(args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
