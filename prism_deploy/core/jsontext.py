"""JSON as the project reads and writes it: strictly JSON, whoever wrote the file.

Python's ``json`` accepts ``NaN``/``Infinity`` (not JSON: other readers refuse the file) and
lets a repeated key silently win; a deeply nested document raises ``RecursionError``. Every
JSON text the project reads from a file (adapter headers and configs, engine manifests,
``model.json``, chain files, graph metadata, ``--ids``) goes through :func:`loads`, so each of
those is bad input named by its file, never a crash or a silently different value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prism_deploy.core.errors import PrismInputError


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"key {key!r} appears twice")
        obj[key] = value
    return obj


def loads(text: str | bytes, where: str, error: type[PrismInputError] = PrismInputError) -> Any:
    """Parse ``text``; anything that is not strict JSON raises ``error`` naming ``where``."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_refuse_duplicates)
    except RecursionError:
        raise error(f"{where}: not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        # ValueError also covers an integer literal over Python's int-from-string limit
        message = " ".join(str(exc).split())
        raise error(f"{where}: not valid JSON ({message[:200]})") from None


def load_file(path: str | os.PathLike[str], error: type[PrismInputError] = PrismInputError) -> Any:
    """The JSON file at ``path``, read and parsed as :func:`loads` does; a file that cannot be
    read raises ``error`` naming it too."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return loads(text, str(path), error)


def dumps(obj: Any, **kwargs: Any) -> str:
    """JSON text, refusing NaN and infinities (``ValueError``) rather than writing non-JSON."""
    return json.dumps(obj, allow_nan=False, **kwargs)
