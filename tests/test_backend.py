"""The backend door: device selection, array modules, seeds, errors, and the CuPy-free CPU path."""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import minilora as ml
from minilora import backend


def test_default_device_is_cpu_and_xp_is_numpy():
    assert backend.get_device() == "cpu"
    assert backend.xp() is np
    assert backend.get_xp(np.zeros(2), 3.0) is np


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        backend.set_device("tpu")


def test_cuda_without_gpu_names_what_is_missing():
    if backend.cuda_available():
        pytest.skip("a GPU is present here")
    with pytest.raises(RuntimeError, match=r"device 'cuda' requested but (CuPy is not installed|CuPy is "
                                           r"installed but no CUDA GPU)"):
        backend.set_device("cuda")
    assert backend.get_device() == "cpu"  # a failed switch changes nothing


def test_env_var_sets_default_device():
    code = "from minilora import backend; print(backend._device)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"MINILORA_DEVICE": "cpu", "PATH": ""}, check=True)
    assert out.stdout.strip() == "cpu"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"MINILORA_DEVICE": "gpu0", "PATH": ""})
    assert bad.returncode != 0 and "MINILORA_DEVICE='gpu0' is not a device" in bad.stderr


def test_to_numpy_and_to_device_round_trip():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert backend.to_device(a, "cpu") is a
    np.testing.assert_array_equal(backend.to_numpy(a), a)
    np.testing.assert_array_equal(ml.Tensor(a).numpy(), a)


def test_manual_seed_is_deterministic():
    backend.manual_seed(123)
    a = backend.rng().standard_normal(5)
    backend.manual_seed(123)
    b = backend.rng().standard_normal(5)
    np.testing.assert_array_equal(a, b)


def test_default_float_is_float32_and_float64_available():
    assert ml.Tensor([1.0, 2.0]).dtype == np.float32
    with backend.default_float_dtype(np.float64):
        assert ml.Tensor([1.0]).dtype == np.float64
    assert ml.Tensor([1.0]).dtype == np.float32
    with pytest.raises(ValueError, match="float32 or float64"):
        backend.set_default_float(np.int32)


def test_ops_keep_float32():
    """Python and NumPy float64 scalars must not promote float32 activations to float64."""
    x = ml.Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    y = (x * 2.0 + np.float64(1.5)) / 3 - x ** 2
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_scatter_add_accumulates_repeats():
    target = np.zeros((4, 2))
    backend.scatter_add(target, np.array([1, 3, 1, 1]), np.ones((4, 2)))
    np.testing.assert_array_equal(target[:, 0], [0, 3, 0, 1])
    t3 = np.zeros(5)
    backend.scatter_add(t3, np.array([0, 0, 4]), np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(t3, [3, 0, 0, 0, 3])


def test_only_backend_imports_cupy():
    """The one-door rule, checked on the source: no other module imports CuPy."""
    import pathlib
    import re
    root = pathlib.Path(ml.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "backend.py"
                 and re.search(r"^\s*(import cupy|from cupy)", p.read_text(), re.M)]
    assert offenders == []


@pytest.mark.cuda
def test_cuda_round_trip(cuda_device):
    a = np.arange(4, dtype=np.float32)
    d = backend.to_device(a, "cuda")
    assert backend.get_xp(d) is not np
    np.testing.assert_array_equal(backend.to_numpy(d), a)


_FAULTS_PER_ROUND = """
import resource, sys, threading, numpy as np
from minilora import backend
backend.keep_freed_host_memory()  # what the CLI and train() do; MINILORA_KEEP_FREED_MEMORY=0: nothing
def round_():                     # a training step's pattern: many live buffers, then all freed
    bufs = [np.ones(256 * 1024 * (1 + i % SIZES), np.float32) for i in range(40)]   # 1..SIZES MiB
    del bufs
def measure(out):
    for _ in range(3):
        round_()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(5):
        round_()
    out.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 5)
SIZES, where = int(sys.argv[1]), sys.argv[2]
out = []
if where == "main":
    measure(out)
else:                             # a worker thread, as data_parallel's micro-batches run in
    t = threading.Thread(target=measure, args=(out,))
    t.start()
    t.join()
print(out[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc tuning applies to glibc on Linux only")
def test_freed_host_memory_is_reused_without_page_faults():
    """After keep_freed_host_memory() (MINILORA_KEEP_FREED_MEMORY=1) freed buffers are reused: a round of
    40 MiB of allocations costs (almost) no page faults; with the tuning off, glibc returns the memory
    to the kernel and every round faults all 10,240 pages in again."""
    def faults(keep, sizes=1, where="main"):
        env = dict(os.environ, MINILORA_KEEP_FREED_MEMORY=keep)
        out = subprocess.run([sys.executable, "-c", _FAULTS_PER_ROUND, str(sizes), where],
                             capture_output=True, text=True, env=env, check=True)
        return float(out.stdout.strip())
    assert faults("1") < 100
    assert faults("0") > 5000
    # in a worker thread, with buffers of 1 to 12 MiB: one malloc arena for every thread keeps them
    # too (a thread's own arena unmapped its heaps: ~10,800 faults a round when measured)
    assert faults("1", 12, "worker") < 100
    assert faults("0", 12, "worker") > 1000        # 5,401 measured (glibc 2.36)


# A child process that records every mallopt() call: ctypes.CDLL is replaced before minilora is
# imported, so the record also covers whatever runs at import time.
_MALLOPT_SPY = """
import ctypes, json, sys
calls = []
class Libc:
    def __init__(self, *a, **k):
        pass
    def mallopt(self, param, value):
        calls.append([param, value])
        return 1
ctypes.CDLL = Libc
import minilora, minilora.train, minilora.cli, minilora.data_parallel, minilora.lora, minilora.quant
from minilora import backend
after_import = (list(calls), backend.host_memory_kept())
if sys.argv[1] == "train":
    import numpy as np
    from minilora.models import LlamaConfig, LlamaForCausalLM
    from minilora.optim import AdamW
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2))
    ids = np.zeros((2, 4), np.int64)
    for _ in range(2):
        minilora.train.train(model, lambda s: (ids, ids), AdamW(model.parameters()), steps=1,
                             progress=False)
elif sys.argv[1] == "cli":
    import types
    cmd = types.ModuleType("spy_command")
    cmd.add_arguments = lambda parser: None
    cmd.run = lambda args: 0
    sys.modules["spy_command"] = cmd
    minilora.cli.SUBCOMMANDS["spy"] = ("spy_command", "a command that does nothing")
    assert minilora.cli.main(["spy"]) == 0
print(json.dumps({"import": after_import, "after": (calls, backend.host_memory_kept())}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc tuning applies to glibc on Linux only")
@pytest.mark.parametrize("then", ["train", "cli"])
def test_import_leaves_malloc_alone_and_train_or_the_cli_opts_in_once(then):
    """``import minilora`` (and its submodules) never calls mallopt: it is process-wide, so a
    library does not change it on import. train() (every call, first one only) and every CLI
    command apply it once; MINILORA_KEEP_FREED_MEMORY=0 keeps glibc's defaults there too."""
    import json

    from minilora import settings

    def spy(keep):
        env = dict(os.environ, MINILORA_KEEP_FREED_MEMORY=keep)
        out = subprocess.run([sys.executable, "-c", _MALLOPT_SPY, then], capture_output=True,
                             text=True, env=env, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    on = spy("1")
    assert on["import"] == [[], False]
    assert on["after"] == [[[backend._M_MMAP_THRESHOLD, settings.HOST_MMAP_THRESHOLD],
                            [backend._M_TRIM_THRESHOLD, settings.HOST_TRIM_THRESHOLD],
                            [backend._M_ARENA_MAX, 1]], True]      # once, though train ran twice
    assert spy("0") == {"import": [[], False], "after": [[], False]}
