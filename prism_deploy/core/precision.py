"""Precisions: the one home of what each precision name means.

An adapter graph's precision (``Precision``) says how its weights are stored and in which
dtype it computes; a model graph's precision (``ModelPrecision``) says the same of an exported
language model. Every layer, every CLI ``choices=`` and the docs' tables take their names and
facts from here; a value from a user or a file goes through ``parse`` (one error line naming
the option).

Both are ``str`` enums: a member equals its name (``Precision.FP16 == "fp16"``), so manifests,
JSON and command lines keep plain strings.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import numpy as np

from prism_deploy.core.errors import PrismInputError


class Precision(str, Enum):
    """How an adapter graph stores its tiles and computes (docs/precision.md)."""

    FP32 = "fp32"  # float32 weights and compute
    FP16 = "fp16"  # float16 weights and compute (gates stay float32)
    INT8 = "int8"  # int8 tiles with a float32 scale per tile row, float16 compute
    INT8_QDQ = "int8-qdq"  # int8 tiles and int8 activations (calibrated), float16 compute
    INT4 = "int4"  # 4-bit tiles (MatMulNBits; gated: GatherBlockQuantized), a float32 scale per tile row, fp16 compute

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Any, option: str = "--precision") -> Precision:
        return _parse(cls, value, option)

    @property
    def compute_dtype(self) -> np.dtype:
        """The dtype the graph's MatMuls run in (gates are float32 in every precision)."""
        return np.dtype(np.float32 if self is Precision.FP32 else np.float16)

    @property
    def weight_dtype(self) -> np.dtype:
        """The dtype the graph stores its tiles in (int4: uint8 bytes of two 4-bit codes)."""
        return np.dtype(
            {Precision.FP32: np.float32, Precision.FP16: np.float16, Precision.INT4: np.uint8}.get(self, np.int8)
        )

    @property
    def quantized(self) -> bool:
        """Integer weights (int8 dequantized in the graph or by the kernel; int4 by ONNX Runtime's
        MatMulNBits or GatherBlockQuantized)."""
        return self in (Precision.INT8, Precision.INT8_QDQ, Precision.INT4)

    @property
    def bits(self) -> int | None:
        """Bits per stored weight of a quantized precision (None for the float ones)."""
        return {Precision.INT8: 8, Precision.INT8_QDQ: 8, Precision.INT4: 4}.get(self)

    @property
    def quantizes_activations(self) -> bool:
        return self is Precision.INT8_QDQ

    @property
    def weight_bytes(self) -> float:
        """Bytes per stored tile value (int4: 0.5, two values share a byte)."""
        return 0.5 if self is Precision.INT4 else float(self.weight_dtype.itemsize)

    @property
    def side_bytes(self) -> int:
        """Bytes of the small float tensors beside the weights (biases, per-row scales)."""
        return 2 if self is Precision.FP16 else 4

    @property
    def rank(self) -> int:
        """Order from most to least precise (the loosest part of a pipeline sets its tolerances)."""
        return list(Precision).index(self)


class ModelPrecision(str, Enum):
    """How an exported model graph (``export-model``) stores its weights."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"  # weight-only: float activations (prism_deploy.models.quantize)
    INT4 = "int4"  # weight-only, block-quantized

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Any, option: str = "--precision") -> ModelPrecision:
        return _parse(cls, value, option)

    @property
    def float_dtype(self) -> np.dtype:
        """The dtype of the graph's float inputs and outputs (embeddings, KV cache)."""
        return np.dtype(np.float16 if self is ModelPrecision.FP16 else np.float32)

    @property
    def weight_only(self) -> bool:
        return self in (ModelPrecision.INT8, ModelPrecision.INT4)

    @property
    def bits(self) -> int | None:
        """Bits per stored weight of a weight-only precision (None for the float ones)."""
        return {ModelPrecision.INT8: 8, ModelPrecision.INT4: 4}.get(self)


PRECISIONS: tuple[str, ...] = tuple(p.value for p in Precision)
MODEL_PRECISIONS: tuple[str, ...] = tuple(p.value for p in ModelPrecision)
# int8-qdq activation calibrators: max |x|, or the 99.99th percentile of |x|
CALIBRATORS = ("max", "percentile")
# The tolerance sets of an end-to-end check: named by the least precise part of the pipeline.
PIPELINE_TOLERANCE_SETS = ("fp32", "fp16", "int8", "int4")


def _parse(cls: Any, value: Any, option: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise PrismInputError(f"{option}: {value!r} is not one of {choices}") from None


def parse_precision_list(text: str, option: str = "--precision") -> tuple[Precision, ...]:
    """Comma-separated adapter precisions, in the order given, duplicates dropped."""
    names = [p.strip() for p in str(text).split(",") if p.strip()]
    if not names:
        raise PrismInputError(f"{option}: empty list")
    return tuple(dict.fromkeys(Precision.parse(n, option) for n in names))


def loosest(names: Any) -> str:
    """The tolerance set of a pipeline whose parts have these precisions: ``int4`` if any part
    is int4, ``int8`` if any is int8 (weights or activations), else ``fp16`` if any is half,
    else ``fp32``."""
    found = {str(n) for n in names if n}
    for family in ("int4", "int8", "fp16"):
        if any(n.startswith(family) for n in found):
            return family
    return "fp32"
