"""Entry point of the Python-backend models a graph adds (copied as ``model.py``): a fusion
adapter's concatenation, a logit fusion and the graph's ``generate``
(:mod:`prism_deploy.serving.graph_backend`). Made importable as ``triton_model.py`` does."""

from __future__ import annotations

import os
import sys

CODE_VARIABLE = "PRISM_DEPLOY_BACKEND_CODE"  # as triton_model.py: set by `serve`

_code = os.environ.get(CODE_VARIABLE)
if _code and _code not in sys.path:
    sys.path.insert(0, _code)

from prism_deploy.serving.graph_backend import TritonPythonModel  # noqa: E402,F401
