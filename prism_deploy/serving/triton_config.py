"""``config.pbtxt``: built as a dict, turned into Triton's own ``ModelConfig`` message, checked.

The message type is Triton's (``tritonclient.grpc.model_config_pb2.ModelConfig``, generated
from ``model_config.proto``), so a field Triton does not know, a wrong type or a wrong enum
name fails here, at write time, not when the server loads the repository. The text written is
``text_format.MessageToString`` of that message, parsed back once more with
``text_format.Parse`` before anything is written. On top of the schema, :func:`check_config`
and :func:`check_repository` check what the schema cannot: dims, batching, unique names, and
that every ensemble step exists and its tensors connect with matching types and widths.
"""

from __future__ import annotations

from typing import Any

from prism_deploy.core.errors import PrismInputError

DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "bool": "TYPE_BOOL",
    "int8": "TYPE_INT8",
}


def _message_type() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise PrismInputError(
            "tritonclient is not installed (pip install 'prism-deploy[serve]'); it carries "
            "Triton's model configuration schema"
        ) from None
    return model_config_pb2.ModelConfig


def to_message(config: dict[str, Any]) -> Any:
    """The ``ModelConfig`` for ``config`` (proto field names); schema errors are bad input."""
    from google.protobuf import json_format

    try:
        return json_format.ParseDict(config, _message_type()())
    except json_format.ParseError as exc:
        raise PrismInputError(
            f"model {config.get('name', '?')!r}: config.pbtxt does not fit Triton's schema "
            f"({' '.join(str(exc).split())})"
        ) from None


def parse_text(text: str, where: str) -> Any:
    """Parse ``config.pbtxt`` text into a ``ModelConfig`` (what Triton does when it loads it)."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, _message_type()())
    except text_format.ParseError as exc:
        raise PrismInputError(
            f"{where}: not a valid Triton model configuration ({' '.join(str(exc).split())})"
        ) from None


def render(config: dict[str, Any]) -> str:
    """Schema-checked ``config.pbtxt`` text for ``config``, with :func:`check_config` applied."""
    from google.protobuf import text_format

    message = to_message(config)
    text = text_format.MessageToString(message)
    reparsed = parse_text(text, f"model {config.get('name', '?')!r}")
    check_config(reparsed)
    return text


def _where(message: Any) -> str:
    return f"model {message.name!r}"


def check_config(message: Any) -> None:
    """What the schema allows but Triton (or this project) refuses."""
    where = _where(message)
    if not message.name:
        raise PrismInputError("a model configuration without a name")
    if bool(message.platform) == bool(message.backend):
        raise PrismInputError(f"{where}: set exactly one of platform and backend")
    if message.max_batch_size < 0:
        raise PrismInputError(f"{where}: max_batch_size {message.max_batch_size} < 0")
    if message.HasField("dynamic_batching"):
        if message.max_batch_size == 0:
            raise PrismInputError(f"{where}: dynamic batching needs max_batch_size > 0")
        for size in message.dynamic_batching.preferred_batch_size:
            if not 1 <= size <= message.max_batch_size:
                raise PrismInputError(f"{where}: preferred batch size {size} outside 1..{message.max_batch_size}")
    for group, tensors in (("input", message.input), ("output", message.output)):
        if not tensors:
            raise PrismInputError(f"{where}: no {group}")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise PrismInputError(f"{where}: duplicate {group} names {names}")
        for t in tensors:
            if t.data_type == 0:
                raise PrismInputError(f"{where}: {group} {t.name!r} has no data_type")
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                raise PrismInputError(f"{where}: {group} {t.name!r} dims {list(t.dims)} (each -1 or > 0, at least one)")


def _tensor_map(tensors: Any) -> dict[str, Any]:
    return {t.name: t for t in tensors}


def check_repository(messages: dict[str, Any]) -> None:
    """Names match their folders; every ensemble step exists and connects (types, widths, batching)."""
    for name, message in messages.items():
        if message.name != name:
            raise PrismInputError(f"model folder {name!r}: its config names {message.name!r}")
    for name, message in messages.items():
        if message.platform == "ensemble":
            _check_ensemble(message, messages)


def _dims_agree(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(x == -1 or y == -1 or x == y for x, y in zip(a, b))


def _check_ensemble(message: Any, messages: dict[str, Any]) -> None:
    where = _where(message)
    steps = message.ensemble_scheduling.step
    if not steps:
        raise PrismInputError(f"{where}: an ensemble without steps")
    available = {t.name: (t.data_type, list(t.dims)) for t in message.input}
    for step in steps:
        target = messages.get(step.model_name)
        if target is None:
            raise PrismInputError(f"{where}: step model {step.model_name!r} is not in the repository")
        if target.max_batch_size < message.max_batch_size:
            raise PrismInputError(
                f"{where}: max_batch_size {message.max_batch_size} over step "
                f"{step.model_name!r}'s {target.max_batch_size}"
            )
        inputs, outputs = _tensor_map(target.input), _tensor_map(target.output)
        for key, value in step.input_map.items():
            if key not in inputs:
                raise PrismInputError(f"{where}: step {step.model_name!r} has no input {key!r}")
            if value not in available:
                raise PrismInputError(
                    f"{where}: step {step.model_name!r} reads {value!r}, which no earlier step "
                    "or ensemble input provides"
                )
            dtype, dims = available[value]
            want = inputs[key]
            if dtype != want.data_type or not _dims_agree(dims, list(want.dims)):
                raise PrismInputError(
                    f"{where}: {value!r} ({_type_name(dtype)} {dims}) does not fit "
                    f"{step.model_name}.{key} ({_type_name(want.data_type)} {list(want.dims)})"
                )
        missing = set(inputs) - set(step.input_map) - {k for k, t in inputs.items() if t.optional}
        if missing:
            raise PrismInputError(f"{where}: step {step.model_name!r} leaves input(s) {sorted(missing)} unfed")
        for key, value in step.output_map.items():
            if key not in outputs:
                raise PrismInputError(f"{where}: step {step.model_name!r} has no output {key!r}")
            available[value] = (outputs[key].data_type, list(outputs[key].dims))
    for out in message.output:
        if out.name not in available:
            raise PrismInputError(f"{where}: output {out.name!r} is produced by no step")
        dtype, dims = available[out.name]
        if dtype != out.data_type or not _dims_agree(dims, list(out.dims)):
            raise PrismInputError(
                f"{where}: output {out.name!r} is {_type_name(dtype)} {dims}, declared "
                f"{_type_name(out.data_type)} {list(out.dims)}"
            )


def _type_name(value: int) -> str:
    return str(
        _message_type()
        .DESCRIPTOR.fields_by_name["max_batch_size"]
        .file.enum_types_by_name["DataType"]
        .values_by_number[value]
        .name
    )
