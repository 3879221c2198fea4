"""Bad adapter files: one clean error naming the key or tensor, exit 2, no traceback, nothing else.

Each case writes a file that breaks exactly one rule of format v1 (docs/adapter-format.md),
then checks ``load_adapter`` (AdapterFormatError) and ``prism-deploy inspect`` (exit 2, one
``error:`` line on stderr, nothing on stdout). A hypothesis test mutates a valid file byte-wise
and checks that nothing but a clean load or AdapterFormatError ever comes out.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from prism_deploy import AdapterConfig, AdapterFormatError, PipeSpec, load_adapter
from prism_deploy.cli.main import main
from prism_deploy.reference import random_adapter

CONFIG = AdapterConfig(
    6, 5, (PipeSpec("dense", (2, 2), (3, 3), None), PipeSpec("routed", (1, 2), (5, 3), 1, 0.5)), "weighted"
)


def valid_parts() -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a valid adapter, to break one at a time."""
    tensors = random_adapter(CONFIG, seed=1).tensors()
    metadata = {"format": "prism-adapter", "format_version": "1", "config": CONFIG.dumps()}
    return metadata, {k: v.clone() for k, v in tensors.items()}


def config_json() -> dict:
    return json.loads(CONFIG.dumps())


def raw_file(path: Path, metadata: dict[str, str] | None, tensors: dict[str, torch.Tensor]) -> None:
    """Write with safetensors directly: no format v1 validation on the way."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def valid_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "valid.safetensors"
    metadata, tensors = valid_parts()
    raw_file(path, metadata, tensors)
    return path.read_bytes()


# Each builder writes a broken file at ``path``; the tuple's second item must appear in the message.
def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _meta(**changes: str | None) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        metadata, tensors = valid_parts()
        for key, value in changes.items():
            if value is None:
                metadata.pop(key)
            else:
                metadata[key] = value
        raw_file(path, metadata, tensors)

    return build


def _config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        metadata, tensors = valid_parts()
        obj = config_json()
        edit(obj)
        metadata["config"] = json.dumps(obj)
        raw_file(path, metadata, tensors)

    return build


def _tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        metadata, tensors = valid_parts()
        edit(tensors)
        raw_file(path, metadata, tensors)

    return build


def _header(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        metadata, tensors = valid_parts()
        raw_file(path, metadata, tensors)
        path.write_bytes(edit(path.read_bytes()))

    return build


def _header_text(edit: Callable[[str], str]) -> Callable[[Path], None]:
    """Edit the header's JSON text (the length prefix follows; tensor data is unchanged)."""

    def build(path: Path) -> None:
        metadata, tensors = valid_parts()
        raw_file(path, metadata, tensors)
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = edit(data[8 : 8 + length].decode()).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length :])

    return build


def _onnx_bytes() -> bytes:
    from onnx import TensorProto, helper

    from prism_deploy.core.onnx_io import finalize

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return finalize(helper.make_model(graph)).SerializeToString()


def _set(key: str, value) -> Callable[[dict], None]:
    def edit(obj: dict) -> None:
        target = obj
        *parents, last = key.split("/")
        for part in parents:
            target = target[int(part) if part.isdigit() else part]
        target[last] = value

    return edit


def _setitem(name: str, value) -> Callable[[dict], None]:
    return lambda d: d.__setitem__(name, value)


def _poison(name: str, value: float) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        d[name].view(-1)[1] = value

    return edit


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "text file": (_bytes(b"this is a text file, not safetensors\n" * 3), "not a valid safetensors file"),
    "empty file": (_bytes(b""), "not a valid safetensors file"),
    "truncated": (_header(lambda b: b[:-7]), "not a valid safetensors file"),
    "truncated in header": (_header(lambda b: b[:40]), "not a valid safetensors file"),
    "header length > file": (_header(lambda b: struct.pack("<Q", len(b) * 2) + b[8:]), "not a valid safetensors file"),
    "header length 2^63": (_header(lambda b: struct.pack("<Q", 1 << 63) + b[8:]), "not a valid safetensors file"),
    "header not JSON": (_header(lambda b: b[:8] + b"[" + b[9:]), "not a valid safetensors file"),
    "no metadata": (lambda p: raw_file(p, None, valid_parts()[1]), "metadata.format"),
    "wrong format": (_meta(format="prism"), "metadata.format"),
    "unknown version": (_meta(format_version="2"), "metadata.format_version"),
    "no config": (_meta(config=None), "metadata.config"),
    "config not JSON": (_meta(config="{in_dim: 6"), "config: not valid JSON"),
    "config a list": (_meta(config="[1, 2]"), "config: must be a JSON object"),
    "config huge int": (_meta(config='{"in_dim": 1' + "0" * 5000 + "}"), "config: not valid JSON"),
    "unknown config key": (_config(_set("layers", 3)), "unknown key(s) ['layers']"),
    "in_dim zero": (_config(_set("in_dim", 0)), "config.in_dim"),
    "in_dim a string": (_config(_set("in_dim", "6")), "config.in_dim"),
    "out_dim bool": (_config(_set("out_dim", True)), "config.out_dim"),
    "bad combine": (_config(_set("combine", "mean")), "config.combine"),
    "no pipes": (_config(_set("pipes", [])), "config.pipes"),
    "grid of three": (_config(_set("pipes/0/grid", [2, 2, 1])), "config.pipes[0].grid"),
    "tile zero": (_config(_set("pipes/0/tile", [3, 0])), "config.pipes[0].tile"),
    "no top_k key": (_config(lambda o: o["pipes"][0].pop("top_k")), "config.pipes[0].top_k"),
    "top_k zero": (_config(_set("pipes/1/top_k", 0)), "config.pipes[1].top_k"),
    "top_k > R*C": (_config(_set("pipes/1/top_k", 3)), "config.pipes[1].top_k"),
    "top_k a float": (_config(_set("pipes/1/top_k", 1.0)), "config.pipes[1].top_k"),
    "gate_scale on ungated": (_config(_set("pipes/0/gate_scale", 2.0)), "config.pipes[0].gate_scale"),
    "gate_scale NaN": (_config(_set("pipes/1/gate_scale", float("nan"))), "NaN is not a JSON number"),
    # finite in float64, infinite in float32, where the gate uses it
    "gate_scale 1e308": (
        _config(_set("pipes/1/gate_scale", 1e308)),
        "config.pipes[1].gate_scale: must be finite in float32",
    ),
    "gate_scale 3.5e38": (_config(_set("pipes/1/gate_scale", -3.5e38)), "config.pipes[1].gate_scale"),
    "NaN in a source note": (_config(_set("source", {"loss": float("nan")})), "NaN is not a JSON number"),
    "Infinity in a note": (_config(_set("target", {"x": float("inf")})), "Infinity is not a JSON number"),
    "repeated config key": (
        _meta(config=CONFIG.dumps().replace('{"combine"', '{"in_dim":7,"combine"', 1)),
        "key 'in_dim' appears twice",
    ),
    "repeated tensor key": (
        _header_text(lambda h: h.replace("{", '{"pipes.0.tiles":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},', 1)),
        "key 'pipes.0.tiles' appears twice",
    ),
    "header over the bound": (_config(_set("source", {"lists": [[]] * (6 << 20)})), "over the"),
    "deeply nested note": (
        _meta(config=CONFIG.dumps()[:-1] + ',"source":{"a":' + "[" * 100000 + "]" * 100000 + "}}"),
        "nested too deeply",
    ),
    "an ONNX model": (lambda path: path.write_bytes(_onnx_bytes()), "is an ONNX model"),
    "gate_scale too big": (
        _meta(config=CONFIG.dumps().replace('"gate_scale":0.5', '"gate_scale":1' + "0" * 400)),
        "config.pipes[1].gate_scale",
    ),
    "duplicate names": (_config(_set("pipes/1/name", "dense")), "config.pipes[1].name"),
    "lone surrogate name": (_meta(config=CONFIG.dumps().replace('"routed"', '"\\ud800"')), "config.pipes[1].name"),
    "coverage in": (_config(_set("pipes/0/tile", [3, 2])), "config.pipes[0]"),  # 2*2 = 4 < in_dim 6
    "coverage out": (_config(_set("pipes/1/tile", [4, 3])), "config.pipes[1]"),  # 1*4 = 4 < out_dim 5
    "missing tensor": (_tensors(lambda d: d.pop("pipes.1.gate.bias")), "'pipes.1.gate.bias'"),
    "missing combine": (_tensors(lambda d: d.pop("combine.weight")), "'combine.weight'"),
    "gate on ungated": (_tensors(_setitem("pipes.0.gate.weight", torch.zeros(4, 6))), "'pipes.0.gate.weight'"),
    "extra tensor": (_tensors(_setitem("bias", torch.zeros(5))), "'bias'"),
    "tiles wrong shape": (_tensors(_setitem("pipes.0.tiles", torch.zeros(4, 3, 4))), "'pipes.0.tiles'"),
    "tiles transposed": (_tensors(_setitem("pipes.1.tiles", torch.zeros(2, 3, 5))), "'pipes.1.tiles'"),
    "gate weight wrong shape": (_tensors(_setitem("pipes.1.gate.weight", torch.zeros(2, 5))), "'pipes.1.gate.weight'"),
    "combine wrong shape": (_tensors(_setitem("combine.weight", torch.zeros(3))), "'combine.weight'"),
    "NaN in tiles": (_tensors(_poison("pipes.0.tiles", float("nan"))), "'pipes.0.tiles'"),
    "Inf in gate": (_tensors(_poison("pipes.1.gate.weight", float("inf"))), "'pipes.1.gate.weight'"),
    "-Inf in bias": (_tensors(_poison("pipes.1.gate.bias", float("-inf"))), "'pipes.1.gate.bias'"),
    "NaN in combine": (_tensors(_poison("combine.weight", float("nan"))), "'combine.weight'"),
    "int tiles": (
        _tensors(lambda d: d.__setitem__("pipes.0.tiles", d["pipes.0.tiles"].to(torch.int32))),
        "'pipes.0.tiles': dtype int32",
    ),
    "uint8 bias": (
        _tensors(lambda d: d.__setitem__("pipes.1.gate.bias", d["pipes.1.gate.bias"].to(torch.uint8))),
        "'pipes.1.gate.bias': dtype uint8",
    ),
    "bool combine": (
        _tensors(lambda d: d.__setitem__("combine.weight", d["combine.weight"] > 0)),
        "'combine.weight': dtype bool",
    ),
    "float64 tiles": (
        _tensors(lambda d: d.__setitem__("pipes.1.tiles", d["pipes.1.tiles"].double())),
        "'pipes.1.tiles': dtype float64",
    ),
}


def make_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    build, expected = CASES[case]
    path = tmp_path / "bad.safetensors"
    build(path)
    return path, expected


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse errors
        return int(exc.code or 0)


def test_the_valid_file_loads(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(valid_bytes(tmp_path))
    assert load_adapter(path).config == CONFIG


@pytest.mark.parametrize("case", list(CASES))
def test_load_adapter_raises_one_clean_line(case, tmp_path):
    path, expected = make_case(tmp_path, case)
    with pytest.raises(AdapterFormatError) as info:
        load_adapter(path)
    message = str(info.value)
    assert expected in message and str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_exits_2_with_one_error_line(case, as_json, tmp_path, capsys):
    path, expected = make_case(tmp_path, case)
    code = run_cli(["inspect", str(path), *(["--json"] if as_json else [])])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""  # nothing half-printed before the error
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], captured.err


def test_missing_and_directory_paths(tmp_path, capsys):
    for path in (tmp_path / "absent.safetensors", tmp_path):
        with pytest.raises(AdapterFormatError, match="no such file|not a file"):
            load_adapter(path)
        assert run_cli(["inspect", str(path)]) == 2
        assert capsys.readouterr().err.startswith("error: ")


def test_subprocess_shows_no_traceback(tmp_path):
    path, expected = make_case(tmp_path, "header length > file")
    proc = subprocess.run(
        [sys.executable, "-m", "prism_deploy", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.getcwd(),
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and expected in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- byte-wise mutations -------------------------------------------------------------------
MUTATION = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
    st.floats(0, 1, exclude_max=True),  # where: a fraction of the file (or of the header)
    st.booleans(),  # aim at the header (most of the format's rules live there)
    st.integers(0, 255),
)


def mutate(data: bytes, mutations) -> bytes:
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    buf = bytearray(data)
    for op, where, in_header, value in mutations:
        span = min(header_end, len(buf)) if in_header else len(buf)
        if span == 0:
            break
        pos = int(where * span)
        if op == "flip":
            buf[pos] ^= 1 << (value % 8)
        elif op == "set":
            buf[pos] = value
        elif op == "insert":
            buf[pos:pos] = bytes([value])
        elif op == "delete":
            del buf[pos]
        else:
            del buf[pos:]
    return bytes(buf)


@pytest.fixture(scope="module")
def valid_file_bytes(tmp_path_factory) -> bytes:
    return valid_bytes(tmp_path_factory.mktemp("valid"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_mutated_files_load_cleanly_or_fail_cleanly(mutations, valid_file_bytes, tmp_path):
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(mutate(valid_file_bytes, mutations))
    try:
        adapter = load_adapter(path)
    except AdapterFormatError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    # it loaded, so it is a valid adapter: it must run
    y = adapter(torch.ones(2, adapter.in_dim))
    assert y.shape == (2, adapter.out_dim)


def test_default_gate_scale_on_an_ungated_pipe_is_accepted(tmp_path):
    # some writers emit every optional key with its default; 1.0 on an ungated pipe means nothing
    from prism_deploy.format import AdapterConfig

    obj = CONFIG.to_json()
    ungated = next(i for i, p in enumerate(obj["pipes"]) if p["top_k"] is None)
    obj["pipes"][ungated]["gate_scale"] = 1.0
    assert AdapterConfig.from_json(obj) == CONFIG


@pytest.mark.parametrize("name", ["", "\ud800", "a\ud800b"])
def test_the_writer_refuses_the_names_the_loader_refuses(name, tmp_path):
    with pytest.raises(AdapterFormatError, match=r"config.pipes\[0\].name"):
        AdapterConfig(6, 5, (PipeSpec(name, (2, 2), (3, 3), None),))


def test_the_writer_refuses_notes_that_are_not_json(tmp_path):
    import numpy as np

    from prism_deploy.format import write_adapter_file

    config = AdapterConfig(6, 5, (PipeSpec("p", (2, 2), (3, 3), None),), source_model={"loss": float("nan")})
    with pytest.raises(AdapterFormatError, match="NaN"):
        write_adapter_file(tmp_path / "a.safetensors", config, {"pipes.0.tiles": np.zeros((4, 3, 3), np.float32)})
    assert not (tmp_path / "a.safetensors").exists()


def test_names_with_control_characters_are_printed_escaped(tmp_path, capsys):
    path = tmp_path / "odd.safetensors"
    config = AdapterConfig(6, 5, (PipeSpec("evil\n\x1b[31mred", (2, 2), (3, 3), None),))
    random_adapter(config, seed=0).save(path)
    assert run_cli(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "evil\\n\\x1b[31mred" in out
