"""Entry point of every Triton Python-backend model prism-deploy writes (copied as ``model.py``).

Triton's Python backend imports this file as ``<version>.model`` inside its stub process and
looks up ``TritonPythonModel``. The work is done by :mod:`prism_deploy.serving.backend`, from the
project code that the backend environment carries (``docs/serving.md``); this file only makes
that code importable there.
"""

from __future__ import annotations

import os
import sys

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


_code_path()

from prism_deploy.serving.backend import TritonPythonModel  # noqa: E402,F401
