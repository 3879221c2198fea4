import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing when pytest runs alongside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def serving_stages(tmp_path_factory):
    """Tiny chain stages and adapter builds for the serving tests (tests/serving_helpers.py)."""
    from tests.serving_helpers import make_stages

    return make_stages(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="session")
def serving_env():
    """The Python-backend environment (created from PyPI on a machine's first run, then cached)."""
    from tests.serving_helpers import backend_env

    return backend_env()
