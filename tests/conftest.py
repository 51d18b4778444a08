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
from minilora.settings import reference_mode

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


# MINILORA_TEST_DEVICE=cuda runs the whole suite with CUDA as the default device (the GPU run of
# benchmarks/gpu.py does this); the default "cpu" is what CI and a laptop run.
TEST_DEVICE = os.environ.get("MINILORA_TEST_DEVICE", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "fast_path: checks a fast twin itself (threads, replicas, fused "
                            "ops, kernels); skipped in reference mode, where only the references run")


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE == "cuda" and not backend.cuda_available():
        skip = pytest.mark.skip(reason=f"MINILORA_TEST_DEVICE=cuda but {backend.cuda_unavailable_reason()}")
        for item in items:
            item.add_marker(skip)
    # MINILORA_REFERENCE=1 (CI's second pass): the suite again on the reference path only; a test of
    # the fast machinery has nothing to check there (its twin equals the reference: tested above)
    if reference_mode():
        skip = pytest.mark.skip(reason="fast_path test: MINILORA_REFERENCE=1 runs the references only")
        for item in items:
            if item.get_closest_marker("fast_path"):
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same seeds, on the test device (CPU unless told), in float32."""
    backend.manual_seed(0)
    np.random.seed(0)
    old_dev = backend._device
    if TEST_DEVICE != "cpu":
        backend.set_device(TEST_DEVICE)
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


@pytest.fixture(scope="module")
def smollm2_pair():
    """(minilora model and its load time, transformers model, tokenizer, torch) for the SmolLM2
    GGUF file, both models loaded from it; one pair per test module (tests may change them)."""
    import time

    from minilora.models import LlamaForCausalLM, smollm2_path
    torch = pytest.importorskip("torch", reason="the interop extra is not installed: "
                                "pip install 'minilora[interop]'")
    transformers = pytest.importorskip("transformers", reason="the interop extra is not installed: "
                                       "pip install 'minilora[interop]'")
    pytest.importorskip("gguf", reason="the gguf package is not installed: pip install gguf")
    try:
        path = smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    start = time.perf_counter()
    ours = LlamaForCausalLM.from_pretrained(path)
    seconds = time.perf_counter() - start
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, seconds, hf, tok, torch


@pytest.fixture
def cuda_device():
    """For tests that only make sense on a GPU: skips, with the reason, where there is none."""
    if not backend.cuda_available():
        pytest.skip(f"needs CUDA: {backend.cuda_unavailable_reason()}")
    backend.set_device("cuda")
    yield "cuda"
    backend.set_device("cpu")
