"""Quantities as people read them."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Binary units, as file sizes and memory are shown everywhere in the project: ``1.01 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
