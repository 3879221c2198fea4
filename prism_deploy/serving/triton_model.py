"""Entry point of every Triton Python-backend model prism-deploy writes (copied as ``model.py``).

Triton's Python backend imports this file as ``<version>.model`` inside its stub process and
looks up ``TritonPythonModel``. The work is done by :mod:`prism_deploy.serving.backend`, from the
project code that the backend environment carries (``docs/serving.md``); this file only makes
that code importable there.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
import types

# Where `prism-deploy serve` put the project code for the backend. The stub's embedded
# interpreter ignores PYTHONPATH (checked with tritonserver 2.51), so the path travels in a
# variable of its own; ahead of everything, so a `prism_deploy` in the server's working
# folder cannot shadow it. Without the variable (a container with the project installed in
# the backend environment), the installed package is used.
CODE_VARIABLE = "PRISM_DEPLOY_BACKEND_CODE"


def _code_path() -> None:
    code = os.environ.get(CODE_VARIABLE)
    if code and code not in sys.path:
        sys.path.insert(0, code)


def _bare_packages() -> None:
    """Register ``prism_deploy`` and ``prism_deploy.build`` without running their ``__init__``.

    Both package ``__init__`` files import PyTorch today (through ``prism_deploy.reference`` and
    ``prism_deploy.build.builder``), and the backend environment has no PyTorch; the modules the
    backend uses (``runtime.engines``, ``build.manifest``, ``ort_session``) do not need it.
    TODO(issue 13): delete this function once ``import prism_deploy.runtime`` is torch-free.
    """
    for name in ("prism_deploy", "prism_deploy.build"):
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"{name} is not importable in this Python backend environment "
                              "(see docs/serving.md: the backend environment carries the project code)")
        module = types.ModuleType(name)
        module.__path__ = list(spec.submodule_search_locations)
        module.__spec__ = spec
        module.__file__ = spec.origin
        if name == "prism_deploy" and spec.origin:
            module.__version__ = _literal(spec.origin, "__version__")  # type: ignore[attr-defined]
        sys.modules[name] = module


def _literal(path: str, name: str) -> str:
    """The string assigned to ``name`` at the top level of ``path`` (read, not executed)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return str(ast.literal_eval(node.value))
    return "unknown"


_code_path()
_bare_packages()

from prism_deploy.serving.backend import TritonPythonModel  # noqa: E402,F401
