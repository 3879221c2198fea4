"""The shipped example adapter is what tools/make_example.py makes, and stays small."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from prism_deploy import load_adapter
from tests.tool_helpers import load_tool

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "demo-adapter.safetensors"


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_committed_example_is_what_the_script_makes(tmp_path):
    tool = load_tool("make_example")
    fresh = tmp_path / "demo.safetensors"
    tool.demo_adapter().save(fresh)
    committed, made = load_adapter(EXAMPLE), load_adapter(fresh)
    assert committed.config == made.config == tool.demo_config()
    assert (committed.config.source_model, committed.config.target_model) == (
        made.config.source_model,
        made.config.target_model,
    )
    assert metadata(EXAMPLE) == metadata(fresh)
    # saves are canonical (sorted header), so the committed file is the script's output byte for byte
    assert EXAMPLE.read_bytes() == fresh.read_bytes()
    a, b = committed.tensors(), made.tensors()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32
        assert torch.equal(a[name], b[name]), name


def test_example_is_small_and_shows_every_feature():
    assert EXAMPLE.stat().st_size < 1_000_000
    cfg = load_adapter(EXAMPLE).config
    assert (cfg.in_dim, cfg.out_dim, cfg.combine) == (256, 160, "weighted")
    assert [(p.name, p.grid, p.tile, p.top_k) for p in cfg.pipes] == [
        ("dense", (4, 4), (40, 64), None),
        ("routed", (8, 8), (20, 32), 16),
        ("coarse", (2, 4), (80, 64), 3),
    ]
    assert "synthetic" in cfg.source_model["model"] and "synthetic" in cfg.target_model["model"]


def test_example_runs():
    adapter = load_adapter(EXAMPLE)
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(0))
    y = adapter(x)
    assert y.shape == (2, 3, 160) and torch.isfinite(y).all()
