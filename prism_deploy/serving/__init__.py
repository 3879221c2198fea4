"""Serving layer: Triton Inference Server model repositories for built stages (docs/serving.md).

- :mod:`prism_deploy.serving.stage_runtime`: the one module that calls the project's runtime
  (what a stage folder holds, and running it); the Triton backend code goes only through it.
- :mod:`prism_deploy.serving.triton_config`: ``config.pbtxt`` text, checked against Triton's own schema.
- :mod:`prism_deploy.serving.repository`: stages -> a model repository, written atomically.
- :mod:`prism_deploy.serving.backend`: the Python-backend models (stages, generate) run by Triton.
- :mod:`prism_deploy.serving.env`: the small environment the Python backend runs in.
- :mod:`prism_deploy.serving.server`: starting, waiting for and stopping a real ``tritonserver``.
- :mod:`prism_deploy.serving.update`: a retrained adapter as the next version, hot-swapped.

Nothing here imports PyTorch; the modules import their heavy libraries lazily.
"""
