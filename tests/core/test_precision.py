"""Precisions and defaults: what each precision name means, parsed once at the edge and carried
typed (``core/precision.py``, ``core/defaults.py``)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from prism_deploy.core import defaults
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.precision import ModelPrecision, Precision, parse_precision_list
from prism_deploy.core.tiles import stored_as


def test_each_precision_names_its_own_dtypes():
    assert [p.weight_dtype.name for p in Precision] == ["float32", "float16", "int8", "int8", "uint8"]
    assert [p.compute_dtype.name for p in Precision] == ["float32", "float16", "float16", "float16", "float16"]
    assert [p.weight_bytes for p in Precision] == [4, 2, 1, 1, 0.5]
    assert [p.bits for p in Precision] == [None, None, 8, 8, 4]
    assert [m.float_dtype.name for m in ModelPrecision] == ["float32", "float16", "float32", "float32"]
    assert [m.bits for m in ModelPrecision] == [None, None, 8, 4]


def test_quantize_bits_come_from_the_model_precision():
    from prism_deploy.models import quantize

    assert quantize.BITS == {"int8": 8, "int4": 4}
    assert quantize.make_spec(ModelPrecision.INT4).bits == 4
    assert quantize.make_spec("int8").bits == 8


def test_a_parsed_precision_serialises_as_its_name():
    parsed = parse_precision_list("int8-qdq, fp16,int8-qdq")
    assert parsed == (Precision.INT8_QDQ, Precision.FP16)
    assert json.dumps({"precisions": parsed}) == '{"precisions": ["int8-qdq", "fp16"]}'
    assert f"{parsed[0]}" == "int8-qdq"
    with pytest.raises(PrismInputError, match="--precision: 'fp8' is not one of fp32, fp16, int8, int8-qdq, int4"):
        parse_precision_list("fp16,fp8")


def test_stored_as_rounds_to_the_weight_dtype():
    tiles = np.array([[1.0 + 2.0**-12, -3.0, 0.5, 0.25]], np.float32)
    assert np.array_equal(stored_as(tiles, Precision.FP32), tiles)
    assert np.array_equal(stored_as(tiles, Precision.FP16), tiles.astype(np.float16).astype(np.float32))
    int8 = stored_as(tiles, Precision.INT8)
    assert np.array_equal(int8, stored_as(tiles, Precision.INT8_QDQ))
    assert not np.array_equal(int8, tiles) and np.abs(int8 - tiles).max() <= 3.0 / 127


def test_the_build_and_serving_defaults_are_the_one_defaults_module():
    from prism_deploy.builder.options import EngineConfig, Profile
    from prism_deploy.cli import build_cmd

    parser = argparse.ArgumentParser()
    build_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["build", "a.safetensors"])
    assert (args.batch, args.seq, args.calibrator) == ("1:4:32", "1:64:1024", defaults.CALIBRATOR)
    assert Profile() == Profile(defaults.BATCH_RANGE, defaults.SEQ_RANGE)
    assert defaults.SERVING_PROFILE == Profile().to_json()
    assert EngineConfig("ort-cpu", Precision.FP32, Profile()).calibrator == defaults.CALIBRATOR


def test_runner_precision_is_the_runners_own_or_the_default():
    class Plain:
        pass

    class Says:
        precision = Precision.INT8

    assert defaults.runner_precision(Plain()) == "fp32"
    assert defaults.runner_precision(Says()) == "int8"
