"""Packages that name their pieces without importing them: ``import prism_deploy`` and
``--help`` stay quick and free of PyTorch, and a piece loads on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, table: dict[str, Any], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``table`` maps a name to the module that
    defines it, or to ``(module, attribute)``; a loaded value is kept in ``namespace``."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        target = table[name]
        module, attr = target if isinstance(target, tuple) else (target, name)
        value = getattr(importlib.import_module(module), attr)
        namespace[name] = value
        return value

    return __getattr__
