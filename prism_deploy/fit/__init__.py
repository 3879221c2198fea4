"""Fitting adapters to paired activations: one-shot least squares, gate training, localized refit.

Beside the main layers; uses ``format``, ``reference`` and ``data``. See docs/fitting.md.
Loaded lazily: the command line reads the options' ranges (``fit.option_ranges``) without PyTorch,
which the fitting itself needs.
"""

from __future__ import annotations

from prism_deploy.core.lazy import lazy_getattr

_LAZY = {
    "Metrics": "prism_deploy.fit.evaluate",  # evaluate() itself: from prism_deploy.fit.evaluate (the module's name)
    "FitOptions": "prism_deploy.fit.fitter",
    "FitReport": "prism_deploy.fit.fitter",
    "backfit": "prism_deploy.fit.fitter",
    "fit_adapter": "prism_deploy.fit.fitter",
    "FitLayout": "prism_deploy.fit.layout",
    "fit_config": "prism_deploy.fit.layout",
    "fit_layout": "prism_deploy.fit.layout",
    "WorkerScore": "prism_deploy.fit.localize",
    "score_workers": "prism_deploy.fit.localize",
    "assign_tiles": "prism_deploy.fit.routed",
    "refit_workers": "prism_deploy.fit.routed",
    "PairedData": "prism_deploy.fit.stream",
    "holdout_mask": "prism_deploy.fit.stream",
}
__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
