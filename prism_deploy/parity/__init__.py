"""Parity checks: any runner against the PyTorch reference (docs/precision.md)."""

from prism_deploy.parity.check import (
    DEFAULT_TOLERANCES,
    ParityReport,
    check_parity,
    default_tolerances,
    simulated_stored_tiles,
)

__all__ = ["DEFAULT_TOLERANCES", "ParityReport", "check_parity", "default_tolerances", "simulated_stored_tiles"]
