"""``--plot``: latency against batch per backend and precision, the floor as a dashed line.

matplotlib is an optional dependency: without it the command fails cleanly (exit 2)
before any timing starts, not after.
"""

from __future__ import annotations

import os
from typing import Any

from prism_deploy.core.errors import PrismInputError


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PrismInputError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None


def plot_results(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prism_deploy.core.fsutil import atomic_output

    precisions = sorted({c["precision"] for c in results["cases"]})
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for key in sorted({(c["backend"], c["precision"]) for c in results["cases"]}):
        rows = sorted((c for c in results["cases"] if (c["backend"], c["precision"]) == key), key=lambda c: c["batch"])
        xs = [c["batch"] for c in rows]
        med = [c["median_s"] * 1e3 for c in rows]
        lo = [(c["median_s"] - c["p10_s"]) * 1e3 for c in rows]
        hi = [(c["p90_s"] - c["median_s"]) * 1e3 for c in rows]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=f"{key[0]} {key[1]}")
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    for i, p in enumerate(precisions):
        rows = sorted((f for f in results["floors"] if f["precision"] == p), key=lambda f: f["batch"])
        ax.plot(
            [f["batch"] for f in rows],
            [f["floor_s"] * 1e3 for f in rows],
            linestyle=styles[i % len(styles)],
            color="black",
            alpha=0.6,
            label=f"floor {p}",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (tokens = batch x seq)")
    ax.set_ylabel("latency per call, ms (median, p10-p90)")
    m = results["machine"]
    where = m["gpu"]["name"] if m.get("gpu") else f"{m['cpu_model']}, {m['cpu_cores']} cores"
    ax.set_title(f"{os.path.basename(results['adapter']['path'])} on {where}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
