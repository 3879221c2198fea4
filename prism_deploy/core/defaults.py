"""Defaults: the one home of every value an option takes when the user names none.

Torch-TensorRT keeps its defaults in one ``_defaults.py``; so does this package. The CLI's
``default=`` and help text, the settings dataclasses (``EngineConfig``, ``BuildRequest``,
``Profile``) and the readers of older files (a manifest without a profile, a model folder that
was not built) take them from here, so a default changes in one place. Tolerances are not
defaults (they are bounds a check enforces): they live in ``core/tolerances.py``.
"""

from __future__ import annotations

from typing import Any

from prism_deploy.core.precision import ModelPrecision, Precision

# An engine's shape profile (``build --batch`` / ``--seq``): MIN, OPT, MAX.
BATCH_RANGE: tuple[int, int, int] = (1, 4, 32)
SEQ_RANGE: tuple[int, int, int] = (1, 64, 1024)
# The profile a served model export folder is assumed to accept (it was not built, so it
# names none): the build's own default profile.
SERVING_PROFILE: dict[str, list[int]] = {"batch": list(BATCH_RANGE), "seq": list(SEQ_RANGE)}

# Precisions a build makes when none is named: FP16 and weight-only INT8 where a GPU runs them;
# FP32 on the CPU, which has no fast FP16.
GPU_BUILD_PRECISIONS: tuple[Precision, ...] = (Precision.FP16, Precision.INT8)
CPU_BUILD_PRECISIONS: tuple[Precision, ...] = (Precision.FP32,)
# What an adapter is lowered at to run when none is named (``run``, chains) ...
CPU_RUN_PRECISION = Precision.FP32
GPU_RUN_PRECISION = Precision.FP16
# ... and what ``export`` / ``export-model`` write, and a file that names none was written at.
PRECISION = Precision.FP32
MODEL_PRECISION = ModelPrecision.FP32

# The int8-qdq activation calibrator (``--calibrator``; one of ``precision.CALIBRATORS``).
CALIBRATOR = "max"

# A benchmark (``bench``): the batch sizes it times, and its CPU threads (``bench --threads``,
# ``bench-model --threads``): one, so that timings do not depend on what else the machine runs.
BENCH_BATCHES: tuple[int, ...] = (1, 8, 64)
BENCH_THREADS = 1


def runner_precision(runner: Any) -> str:
    """The precision an adapter runner says it runs; one that says none (any object with
    ``run``) is taken as the default precision."""
    return str(getattr(runner, "precision", None) or PRECISION)


def range_text(values: tuple[int, int, int]) -> str:
    """A profile range as the CLI spells it: ``MIN:OPT:MAX``."""
    return ":".join(str(v) for v in values)
