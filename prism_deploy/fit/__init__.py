"""Fitting adapters to paired activations: one-shot least squares, gate training, localized refit.

Beside the main layers; uses ``format``, ``reference`` and ``data``. See docs/fitting.md.
"""

from prism_deploy.fit.evaluate import Metrics, evaluate
from prism_deploy.fit.fitter import FitOptions, FitReport, backfit, fit_adapter
from prism_deploy.fit.layout import FitLayout, fit_config, fit_layout
from prism_deploy.fit.localize import WorkerScore, score_workers
from prism_deploy.fit.routed import assign_tiles, refit_workers
from prism_deploy.fit.stream import PairedData, holdout_mask

__all__ = [
    "FitOptions",
    "FitLayout",
    "FitReport",
    "Metrics",
    "WorkerScore",
    "PairedData",
    "assign_tiles",
    "backfit",
    "evaluate",
    "fit_adapter",
    "fit_config",
    "fit_layout",
    "holdout_mask",
    "refit_workers",
    "score_workers",
]
