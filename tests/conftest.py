"""Shared test set-up: hypothesis profiles, seeds, and the backend `device` fixture.

Profiles: "ci" (the default: derandomized, no deadline, few examples, so a run is repeatable and
never flaky on a loaded 2-core machine) and "dev" (more examples, random) via
HYPOTHESIS_PROFILE=dev.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from minilora import backend

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same seeds and on the CPU in float32."""
    backend.manual_seed(0)
    np.random.seed(0)
    old_dev = backend._device
    yield
    backend._device = old_dev
    backend.set_default_float(np.float32)


@pytest.fixture(params=DEVICES)
def device(request):
    """Run a test on every backend: "cpu" always, "cuda" where CuPy and a GPU are present."""
    name = request.param
    if name == "cuda" and not backend.cuda_available():
        pytest.skip(f"CUDA backend not available: {backend.cuda_unavailable_reason()}")
    backend.set_device(name)
    yield name
    backend.set_device("cpu")


def requires_torch():
    return pytest.importorskip("torch", reason="the interop extra (torch) is not installed")


@pytest.fixture
def cuda_device():
    """For tests that only make sense on a GPU: skips, with the reason, where there is none."""
    if not backend.cuda_available():
        pytest.skip(f"needs CUDA: {backend.cuda_unavailable_reason()}")
    backend.set_device("cuda")
    yield "cuda"
    backend.set_device("cpu")
