"""Shared fixtures, and one rule for every test: a test runs as on a CPU-only machine unless it
is marked ``gpu``, whatever machine runs it.

``PRISM_DEPLOY_NO_GPU=1`` makes the project's GPU probe (``prism_deploy.core.targets``) answer
"no GPU", so ``--target auto`` and every default resolve the same way on a laptop, on CI and on a
GPU box, and the CPU tests run everywhere instead of skipping where a GPU is present. Tests
marked ``gpu`` see the machine as it is (and skip, with the reason, where there is no GPU).
"""

import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing when pytest runs alongside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _clear_gpu_probes() -> None:
    from prism_deploy.core import targets

    targets.gpu_present.cache_clear()
    targets.gpu_info.cache_clear()


@pytest.fixture(autouse=True)
def cpu_only_unless_marked_gpu(request, monkeypatch):
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("PRISM_DEPLOY_NO_GPU", "1")
    _clear_gpu_probes()
    yield
    _clear_gpu_probes()


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Tiny local models (Llama 64, Qwen2 96, GPT-2 48 wide), model A (the Llama) and model B (the
    Qwen2) exported once per test run, and a gated adapter from A to B. Tests must not change
    these files: copy them first."""
    from prism_deploy.models.lm_export import export_model
    from prism_deploy.reference import random_adapter, simple_config
    from tests.model_helpers import make_model

    root = tmp_path_factory.mktemp("models")
    z = {kind: make_model(kind, root / kind) for kind in ("llama", "qwen2", "gpt2")}
    z["A"] = root / "A_llama_first"
    z["B"] = root / "B_qwen2_last"
    export_model(z["llama"], "first", z["A"], max_seq=64)
    export_model(z["qwen2"], "last", z["B"], max_seq=64)
    z["adapter"] = root / "adapter.safetensors"
    random_adapter(simple_config(64, 96, (4, 2), top_k=3), seed=5).save(z["adapter"])
    return z


@pytest.fixture(scope="session")
def serving_stages(tmp_path_factory, zoo):
    """Tiny chain stages and adapter builds for the serving tests (tests/serving_helpers.py)."""
    from tests.serving_helpers import make_stages

    return make_stages(tmp_path_factory.mktemp("serving"), zoo)


@pytest.fixture(scope="session")
def serving_env():
    """The Python-backend environment (created from PyPI on a machine's first run, then cached)."""
    from tests.serving_helpers import backend_env

    return backend_env()


def real_model_dir(name: str):
    """The Hugging Face folder of a real model (prism_deploy.models.real), or a skip saying which
    package to install. Converted once into the user's cache, then reused by every test run."""
    from prism_deploy.models import real

    why = real.missing(name)
    if why:
        pytest.skip(f"{why}; the real set needs it ({real.install_hint(name)})")
    return real.model_dir(name)
