# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · The GPU backend
#
# Everything in minilora (the autograd engine, the Llama, LoRA, the NF4 quantizer) is written once,
# against "the array module" `xp`, which is NumPy on the CPU and CuPy on an NVIDIA GPU. CuPy copies
# NumPy's API, so `xp.exp`, `a @ b` and `xp.take` mean the same on both. This notebook:
#
# - shows the **one door**, `minilora.backend`: `xp()`, `get_xp`, `set_device`, `MINILORA_DEVICE`,
#   `to_device` / `to_numpy`. It is the only module that imports CuPy; this notebook never does;
# - asks the backend whether **CUDA is usable here**, and if not, prints its one-line reason;
# - runs **the same code** (a one-value add, matmuls, the tiny Llama's forward+backward, a LoRA step,
#   NF4 dequantization) on every device that is available, timed, with a table and a chart, and, where
#   a GPU is present, checks that **CPU and GPU agree** to float32 tolerance;
# - explains why **small ops are launch-bound** on a GPU: each kernel launch costs ~5–10 µs whatever
#   it computes;
# - shows minilora's **own CUDA kernel**, NF4 dequantization, and its source;
# - shows how the CPU's **two cores** share a training step: **data parallelism**, one micro-batch per
#   thread on a replica of the model, gradients summed;
# - points to `benchmarks/gpu.py`, the one command that measures everything on a GPU.
#
# The outputs stored with this notebook come from a machine without a GPU: there, it says so and shows
# the CPU path. Run it on a machine with CuPy and a GPU and the same cells fill in the GPU column.

# %%
import inspect
import os
import statistics
import time
from collections import Counter

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest (set before NumPy loads)

import matplotlib.pyplot as plt
import numpy as np

import minilora
from minilora import backend
from minilora.lora import LoraConfig, get_peft_model
from minilora.models import LlamaConfig, LlamaForCausalLM
from minilora.optim import AdamW
from minilora.quant import kernels, quantize_nf4, unpack_4bit

FAST = os.environ.get("MINILORA_FAST") == "1"   # fewer timing repeats, smaller sweep for quick CI runs
minilora.manual_seed(0)
np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. One door to the array library
#
# `minilora/backend.py` decides which array module the code gets:
#
# - `backend.xp()`: the module of the **current device**, `numpy` on "cpu", `cupy` on "cuda". Code that
#   creates arrays (a model's weights, a buffer) asks here.
# - `backend.get_xp(*arrays)`: the module the **given arrays** live in. Ops use this: an op on CuPy
#   arrays computes with CuPy, whatever the current device is.
# - `minilora.set_device("cuda")` / `get_device()`, or `MINILORA_DEVICE=cuda` in the environment before
#   Python starts (default "cpu"); `backend.device("cuda")` switches for one `with` block.
# - `backend.to_device(a, device)` moves an array (no copy when it is already there), `backend.to_numpy(a)`
#   brings it back to the host; `Tensor.numpy()` always returns NumPy, and `model.to("cuda")` moves
#   every parameter.
# - Random initialisation draws on the host from `backend.rng()` and then moves to the device, so
#   `manual_seed(0)` gives the **same weights** on the CPU and on the GPU: that is what lets the cells
#   below compare the two.
#
# A device-neutral function takes its module from the data and never names NumPy or CuPy:

# %%
print("MINILORA_DEVICE =", os.environ.get("MINILORA_DEVICE", "(unset, so 'cpu')"))
print("current device:", backend.get_device(), "-> backend.xp() is", backend.xp().__name__)


def rms(x):
    # root mean square of any array: the array module comes from the data, so this runs on both
    xp = backend.get_xp(x)
    return xp.sqrt(xp.mean(x * x))


a = backend.rng().standard_normal((3, 4)).astype(np.float32)   # (3, 4), drawn on the host
d = backend.to_device(a)                                        # on the current device
print("to_device(a) is a (no copy on the CPU):", d is a)
print("rms on", backend.device_of(d), "=", float(rms(d)), "| to_numpy gives a", type(backend.to_numpy(d)).__name__)
print("a Tensor knows its device:", minilora.Tensor(d).device)

# %% [markdown]
# ## 2. Is CUDA usable here?
#
# CUDA needs two things: CuPy importable, and a visible NVIDIA GPU. The backend checks both once and
# remembers why it failed: `backend.cuda_available()` says whether it can, `backend.cuda_unavailable_reason()`
# says why not. Asking for the device anyway raises a one-line `RuntimeError` with the same reason and
# leaves the device as it was.

# %%
CUDA = backend.cuda_available()
if CUDA:
    print("CUDA is usable: CuPy imports and a GPU is visible. The cells below run on 'cpu' and 'cuda'.")
else:
    print("No GPU here:", backend.cuda_unavailable_reason())
    print("So the cells below run the CPU path only; on a machine with CuPy and a GPU they run both.")

try:
    with backend.device("cuda"):
        print("inside backend.device('cuda'): backend.xp() is", backend.xp().__name__)
except RuntimeError as e:
    print("\nbackend.device('cuda') raised RuntimeError:", e)
print("the device is still", repr(backend.get_device()))
DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]

# %% [markdown]
# ## 3. The same code on every device
#
# Each workload below is a function that builds its inputs and returns a closure to time. None of them
# mentions a device: they create arrays with `backend.to_device` and models with `LlamaForCausalLM`,
# and the loop at the end runs each one inside `with backend.device(dev):`. Inputs are drawn once on the
# host (or from `manual_seed(0)`), so every device computes on the same numbers.
#
# Timing a GPU needs care: CuPy returns as soon as a kernel is **queued**, not when it has run. The timer
# calls `backend.synchronize()` (wait for the GPU; a no-op on the CPU) before starting and stopping the
# clock. The first call is not timed: on a GPU it compiles kernels and fills CuPy's memory pool. The
# figure is the median over several repeats, each of which calls the op enough times to last a couple
# of milliseconds.
#
# CPU timings use one BLAS thread (`OMP_NUM_THREADS=1`, as in every notebook here).

# %%
REPEATS = 3 if FAST else 7
host = np.random.default_rng(0)
A64, B64 = host.standard_normal((2, 64, 64), dtype=np.float32)            # (64, 64) each
A1K, B1K = host.standard_normal((2, 1024, 1024), dtype=np.float32)        # (1024, 1024) each
CONFIG = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)    # notebook 06's tiny Llama
IDS = host.integers(0, 256, size=(4, 64))                                 # (B, T) byte ids
W_7B = host.standard_normal((4096, 4096), dtype=np.float32) * 0.02        # one Llama-7B q_proj
Q_HOST = quantize_nf4(W_7B, blocksize=64)                                 # quantized once, on the host


def seconds_per_call(fn, number):
    backend.synchronize()                         # nothing queued from before may count
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    backend.synchronize()                         # wait until the GPU has really finished
    return (time.perf_counter() - t0) / number


def median_time(fn, repeats=REPEATS, min_seconds=2e-3):
    # seconds per call: the median over `repeats`, each the mean of enough back-to-back calls to
    # last about min_seconds (a 1 µs op is called ~2000 times, so the clock's resolution never shows)
    number = min(10_000, max(1, round(min_seconds / max(seconds_per_call(fn, 1), 1e-7))))
    return statistics.median(seconds_per_call(fn, number) for _ in range(repeats))


def tiny_add():
    x = backend.to_device(np.ones(1, dtype=np.float32))                    # (1,)
    return lambda: x + 1


def matmul(A, B):
    def build():
        a, b = backend.to_device(A), backend.to_device(B)                  # (n, n) each
        return lambda: a @ b                                                # (n, n)
    return build


def llama_forward_backward():
    backend.manual_seed(0)                        # the same weights on every device
    model = LlamaForCausalLM(CONFIG).to(backend.get_device())
    ids = backend.to_device(IDS)                                            # (B, T)
    q = model.model.layers[0].self_attn.q_proj.weight                       # (C, C)

    def step():
        model.zero_grad()
        loss = model(ids, labels=ids).loss        # next-token cross-entropy, a scalar
        loss.backward()
        return loss.data, q.grad
    return step


def lora_step():
    backend.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(LlamaForCausalLM(CONFIG), lora).to(backend.get_device())
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    B = dict(model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    ids = backend.to_device(IDS)                                            # (B, T)

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        g = B.grad.copy()                         # compare the gradient: AdamW's first step is ~lr·sign(g)
        opt.step()
        opt.zero_grad()
        return loss.data, g
    return step


def nf4_minilora():
    q = Q_HOST.to(backend.get_device())
    return q.dequantize                           # NumPy: a 256-entry byte table; CUDA: minilora's kernel


def nf4_composed():
    # the same dequantization spelled with plain array ops, for comparison
    q = Q_HOST.to(backend.get_device())
    xp = backend.xp()
    code = backend.to_device(q.code)                                        # (16,)

    def dequantize():
        idx = unpack_4bit(q.packed, q.size)                                 # (n,) uint8
        scale = xp.repeat(q.absmax, q.blocksize)                            # (n,): absmax per value
        return (xp.take(code, idx) * scale).reshape(q.shape)                # (4096, 4096)
    return dequantize


WORKLOADS = {
    "add, 1 value": tiny_add,
    "matmul 64×64": matmul(A64, B64),
    "matmul 1024×1024": matmul(A1K, B1K),
    "tiny Llama forward+backward": llama_forward_backward,
    "LoRA training step": lora_step,
    "NF4 dequantize 4096², composed": nf4_composed,
    "NF4 dequantize 4096², minilora": nf4_minilora,
}

times, results = {}, {}
for dev in DEVICES:
    with backend.device(dev):
        for name, build in WORKLOADS.items():
            fn = build()
            out = fn()                                # the warm-up call, and the result to compare
            results[name, dev] = [backend.to_numpy(r).copy() for r in (out if isinstance(out, tuple) else (out,))]
            times[name, dev] = median_time(fn)


def fmt(seconds):
    return f"{seconds * 1e6:,.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:,.2f} ms"


print(f"{'workload':<32}" + "".join(f"{dev:>13}" for dev in DEVICES) + ("   GPU speed-up" if CUDA else ""))
for name in WORKLOADS:
    row = f"{name:<32}" + "".join(f"{fmt(times[name, dev]):>13}" for dev in DEVICES)
    if CUDA:
        row += f"   {times[name, 'cpu'] / times[name, 'cuda']:>10.1f}×"
    print(row)

# %%
names = list(WORKLOADS)
x = np.arange(len(names))
width = 0.8 / len(DEVICES)
fig, ax = plt.subplots(figsize=(10, 4.2))
for i, dev in enumerate(DEVICES):
    ax.bar(x + (i - (len(DEVICES) - 1) / 2) * width, [times[n, dev] * 1e3 for n in names], width,
           label=dev, color={"cpu": "tab:blue", "cuda": "tab:green"}[dev])
ax.axhspan(5e-3, 10e-3, color="tab:red", alpha=0.25, label="one GPU kernel launch (5–10 µs)")
ax.set_yscale("log")
ax.set_xticks(x, names, rotation=20, ha="right")
ax.set_ylabel("ms per call (median)")
ax.set_title("the same code on " + (" and ".join(DEVICES) if CUDA else "the CPU (no GPU on this machine)"))
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ### Do the devices agree?
#
# The GPU adds and multiplies in a different order than the CPU (cuBLAS and OpenBLAS tile a matmul
# differently; a reduction on the GPU is a tree over thousands of threads), so float32 results differ
# in the last bits. Each rounding is off by at most $2^{-24} \approx 6\cdot 10^{-8}$ relative; a result
# that went through a few hundred roundings can be off by $10^{-6}$ or so. The check below allows
# $10^{-4}$ of each result's largest value: loose enough for a different order of summation, tight
# enough to catch a real bug (a wrong index or a missing term is off by order 1). NF4 dequantization is
# one multiply per value, rounded the same way on both devices, so it must match **bit for bit**.

# %%
TOL = 1e-4


def max_rel_diff(a, b):
    # max |a - b| relative to the largest |a|: float32 rounding shows up as ~1e-7 .. 1e-5
    scale = max(float(np.abs(a).max()), float(np.finfo(np.float32).tiny))
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) / scale


if CUDA:
    print(f"{'workload':<32} {'max |cpu − gpu| / max |cpu|':>28}  agree")
    bad = []
    for name in WORKLOADS:
        diff = max(max_rel_diff(c, g) for c, g in zip(results[name, "cpu"], results[name, "cuda"]))
        exact = name.startswith("NF4")
        ok = diff == 0 if exact else diff < TOL
        print(f"{name:<32} {diff:>28.2e}  {'bit for bit' if exact and ok else ok}")
        if not ok:
            bad.append(name)
    assert not bad, f"CPU and GPU disagree beyond float32 tolerance on {bad}"
else:
    print("Only the CPU ran, so there is nothing to compare here. With a GPU this cell prints, for every")
    print(f"workload, max |cpu − gpu| / max |cpu| (must stay below {TOL:g}; NF4 must be 0) and fails if not.")
    loss = results["tiny Llama forward+backward", "cpu"][0]
    print(f"\nThe CPU's results are kept for that comparison, e.g. the tiny Llama's loss {float(loss):.6f}"
          f" (ln 259 = {np.log(259):.6f} for a model that knows nothing).")

# %% [markdown]
# ## 4. Why small ops are launch-bound on a GPU
#
# A GPU does nothing until the CPU tells it to: every array operation is a **kernel launch**, a request
# that goes from Python through CuPy and the CUDA driver into the GPU's queue. That costs roughly
# 5–10 µs per launch, however little the kernel computes. So an op costs about
#
# $$t_\text{GPU} \approx t_\text{launch} + \max\Big(\frac{\text{FLOPs}}{\text{peak FLOP/s}},\ \frac{\text{bytes moved}}{\text{memory bandwidth}}\Big),
# \qquad t_\text{launch} \approx 5\text{–}10\ \mu s,$$
#
# while on the CPU NumPy's overhead per call is about 1 µs and the arithmetic is slower. The first row
# of the table shows it: adding 1 to one value is a launch and nothing else. A GPU only wins when the
# second term is large, i.e. for big arrays. A matmul of $n \times n$ matrices costs $2n^3$ FLOPs: here
# on the CPU against sizes, with the band a GPU can never go below:

# %%
sizes = [16, 32, 64, 128, 256, 512] + ([] if FAST else [1024])
sweep = {}
for dev in DEVICES:
    with backend.device(dev):
        for n in sizes:
            A, B = host.standard_normal((2, n, n), dtype=np.float32)      # (n, n) each
            fn = matmul(A, B)()
            fn()                                                             # warm-up
            sweep[dev, n] = median_time(fn, repeats=3 if FAST else 5)

print(f"{'n':>6}" + "".join(f"{dev + ' time':>14}{dev + ' GFLOP/s':>14}" for dev in DEVICES))
for n in sizes:
    print(f"{n:>6}" + "".join(f"{fmt(sweep[dev, n]):>14}{2 * n**3 / sweep[dev, n] / 1e9:>14.1f}" for dev in DEVICES))

fig, ax = plt.subplots(figsize=(7.5, 4.2))
for dev in DEVICES:
    ax.loglog(sizes, [sweep[dev, n] * 1e6 for n in sizes], "o-", label=dev,
              color={"cpu": "tab:blue", "cuda": "tab:green"}[dev])
ax.axhspan(5, 10, color="tab:red", alpha=0.25, label="one GPU kernel launch (5–10 µs)")
ax.set_xticks(sizes, [str(n) for n in sizes])
ax.minorticks_off()
ax.set_xlabel("n (an n×n @ n×n matmul)")
ax.set_ylabel("µs per matmul (median)")
ax.set_title("matmul time against size")
ax.legend()
fig.tight_layout()
plt.show()
under_launch = [n for n in sizes if sweep["cpu", n] <= 10e-6]
if under_launch:
    print(f"On this CPU a matmul up to n = {max(under_launch)} takes under 10 µs: at those sizes no GPU "
          "can be faster, its launch alone takes as long.")

# %% [markdown]
# The tiny Llama is made of such small ops. Its graph records every autograd op (notebook 01); each
# is at least one kernel forward and one backward, and most are several (`sdpa` alone is a matmul, a
# scale, a mask, a max, a subtraction, an exponential, a sum, a division and another matmul). Against
# that, the arithmetic of a forward+backward is about $6 \times \text{parameters} \times \text{tokens}$
# FLOPs, which a data-centre GPU (tens of TFLOP/s in float32) does in a few microseconds:

# %%
with backend.device("cpu"):                  # the graph is the same on every device
    backend.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    loss = model(IDS, labels=IDS).loss
graph = loss._topological_order()               # every tensor the backward pass will visit
ops = Counter(t._op for t in graph if t._op)    # leaves (the weights) have no op
n_ops = sum(ops.values())
n_params, n_tokens = model.num_parameters(), IDS.size
flops = 6 * n_params * n_tokens
print(f"{n_ops} autograd ops in one forward pass:", dict(ops.most_common()))
print(f"=> at least {2 * n_ops} kernel launches per forward+backward, at least "
      f"{2 * n_ops * 5e-3:.2f} ms of launches on any GPU at 5 µs each")
print(f"arithmetic: 6 × {n_params:,} parameters × {n_tokens} tokens = {flops / 1e6:.0f} MFLOP, "
      f"{flops / 50e12 * 1e6:.1f} µs at 50 TFLOP/s")
print(f"this CPU: {fmt(times['tiny Llama forward+backward', 'cpu'])} for the whole forward+backward"
      + (f"; this GPU: {fmt(times['tiny Llama forward+backward', 'cuda'])}" if CUDA else ""))

# %% [markdown]
# At this size a GPU spends almost all its time being told what to do: the launches outweigh the
# arithmetic by a factor of a hundred or more, so the GPU's advantage is capped by how many launches it
# can take per millisecond, not by its FLOPs. Bigger models (the `medium` config of `benchmarks/gpu.py`,
# hidden size 1024, 16 × 512 tokens per batch) give each launch enough work for the GPU to pull ahead.
# The other way to cut launches is to **fuse** several operations into one kernel of your own, which is
# what the next section does for NF4.
#
# ## 5. A kernel of our own: NF4 dequantization
#
# QLoRA dequantizes every frozen 4-bit weight on every forward pass (notebook 07), so this is QLoRA's
# hot path. Spelled with array ops (the "composed" row above) it takes several passes over the data:
# unpack the nibbles (two shifts/masks into a new index array), gather the code values, repeat the
# per-block absmax to every value, multiply. Each pass is a kernel launch and a round trip through
# memory: about 25 bytes of traffic per value. minilora's kernel does it in **one launch, one thread per
# output value**: read the byte, pick the nibble, look the code up, multiply by the block's absmax,
# write the float: $\tfrac12 + \tfrac{4}{64} + 4 \approx 4.6$ bytes per value, so it runs at the
# memory bandwidth's limit.
#
# The kernel body is CUDA C, kept as a string in `minilora.quant.kernels`:

# %%
print(kernels.DEQUANTIZE_4BIT_SOURCE)

# %% [markdown]
# CuPy's `ElementwiseKernel` wraps that body in a loop over the output: `i` is the index of the value
# this thread computes and `y` is its output element (`y[i]`). Parameters marked `raw` are whole arrays
# the body indexes itself (`packed[i >> 1]`: value $i$ lives in byte $i/2$, the even value in the high
# nibble, as in bitsandbytes; `absmax[i / blocksize]`: the scale of value $i$'s block). `__fmul_rn` is
# an IEEE round-to-nearest multiply, the same single rounding NumPy does, so the GPU result is bit for
# bit the CPU's. The kernel is described in `quant/kernels.py` but compiled by `backend.elementwise_kernel`,
# so CuPy stays behind the one door:

# %%
print(inspect.getsource(kernels.dequantize_4bit_kernel))
if not CUDA:
    try:
        kernels.dequantize_4bit_kernel()
    except RuntimeError as e:                     # without a GPU there is nothing to compile it for
        print("compiling it here raises RuntimeError:", e)

# %% [markdown]
# `NF4Tensor.dequantize()` picks the path by where the packed bytes live: NumPy arrays go through a
# 256-entry table (each byte's two float32 values at once), CuPy arrays through the kernel. The composed
# version and minilora's agree bit for bit on every device that ran:

# %%
for dev in DEVICES:
    composed, own = results["NF4 dequantize 4096², composed", dev][0], results["NF4 dequantize 4096², minilora", dev][0]
    ratio = times["NF4 dequantize 4096², composed", dev] / times["NF4 dequantize 4096², minilora", dev]
    print(f"{dev}: composed == minilora bit for bit: {np.array_equal(composed, own)}; "
          f"the composed ops take {ratio:.1f}× as long as minilora's path")
n = Q_HOST.size
stored = Q_HOST.nbytes + 4 * n                   # read packed + absmax, write float32
print(f"{n:,} values: {stored / 2**20:.0f} MiB of memory traffic for one fused pass "
      f"({stored / n:.2f} bytes per value); at 3 TB/s that is {stored / 3e12 * 1e6:.0f} µs")

# %% [markdown]
# ## 6. Two CPU cores, one batch: data parallelism
#
# A GPU runs each op on thousands of cores. NumPy runs each op on *one* CPU core, so minilora's fused
# ops split their rows over a small pool of threads (`minilora.fast.parallel`). That costs a hand-off per
# op, hundreds per training step. The training loop (`minilora.train`) splits the *batch* instead, as
# PyTorch's DistributedDataParallel does across GPUs (`minilora.data_parallel.forward_backward`):
#
# - the batch of $B$ sequences is cut into one micro-batch per thread; micro-batch $k$ has $n_k$
#   target tokens out of $N$, and its mean loss $L_k$ is weighted by $n_k / N$, so
#   $L = \sum_k \frac{n_k}{N} L_k$ is the full batch's mean loss and
#   $\nabla L = \sum_k \frac{n_k}{N} \nabla L_k$ its gradient;
# - each thread runs forward and backward on a **replica** of the model: new `Parameter` objects over
#   the *same* arrays (no weight is copied), so each thread writes its own `.grad`;
# - the replicas' gradients are added in a fixed order, so a seed gives the same bits every run.
#
# NumPy releases Python's GIL inside every ufunc and matmul, so the two threads really compute at
# once. Below, the same batch both ways: the gradients agree to float32 rounding (the sums run in a
# different order), and the split step is timed against the plain one.

# %%
from minilora import data_parallel
from minilora.fast import parallel

dp_model = LlamaForCausalLM(CONFIG)
dp_ids = host.integers(0, 256, size=(16, 64))                             # (B, T): 1,024 tokens


def gradients(n_threads):
    for p in dp_model.parameters():
        p.grad = None
    loss = data_parallel.forward_backward(dp_model, dp_ids, dp_ids, n_threads=n_threads).item()
    return loss, {n: p.grad.copy() for n, p in dp_model.named_parameters()}


loss_1, grads_1 = gradients(1)                   # the plain step: one thread, the whole batch
loss_2, grads_2 = gradients(2)                   # two micro-batches of 8 sequences, two threads
worst = max(float(np.abs(grads_2[n] - grads_1[n]).max() / np.abs(grads_1[n]).max()) for n in grads_1)
print(f"loss: plain {loss_1:.6f}, split {loss_2:.6f}")
print(f"largest gradient difference, relative to that gradient's largest entry: {worst:.1e}")
if parallel.num_threads() > 1:
    t_plain = median_time(lambda: gradients(1), min_seconds=0.05)
    t_split = median_time(lambda: gradients(2), min_seconds=0.05)
    print(f"forward + backward: plain {t_plain * 1e3:.1f} ms, split over 2 threads "
          f"{t_split * 1e3:.1f} ms ({t_plain / t_split:.2f}x faster)")
else:
    print("one CPU thread here (MINILORA_NUM_THREADS or a single core): nothing to split")

# %% [markdown]
# The two agree to about $10^{-6}$ of each gradient's scale: float32 rounding (each weight gradient
# sums a thousand token contributions, each rounded at $6 \cdot 10^{-8}$, in another order). On two
# cores the split step is faster,
# though not twice as fast: the Python between the ops takes turns on the GIL, and each thread builds
# its replica. For small batches the turns cost more than the halved arithmetic saves, so
# `forward_backward` only splits when every micro-batch gets at least
# `settings.MIN_TOKENS_PER_MICRO_BATCH` tokens (512); the training loop calls it at every step.
#
# ## 7. Measuring on a real GPU: `benchmarks/gpu.py`
#
# This notebook times single operations. The whole picture on a GPU comes from one command:
#
# ```bash
# pip install -e ".[cuda,interop]"
# python benchmarks/gpu.py --out gpu-results      # about 5 minutes on one GPU
# ```
#
# It runs the test suite with CUDA as the default device (`MINILORA_TEST_DEVICE=cuda`) plus the
# GPU-only tests, then times one training step (full fine-tuning, LoRA, QLoRA) of minilora on CuPy and
# of transformers + PEFT on PyTorch CUDA at three sizes, with peak GPU memory against
# `minilora.memory`'s prediction, and writes `gpu.json` and `gpu.md`. Without a GPU it stops at once
# with the backend's reason; `python benchmarks/gpu.py --skip-tests --configs tiny --steps 3 --device cpu`
# checks its plumbing on the CPU. Results go to `docs/benchmarks.md`.
#
# ## What to take away
#
# - One module, `minilora.backend`, knows about CuPy. Everything else asks it for `xp`, so the same
#   code runs on NumPy and CuPy; `set_device` / `MINILORA_DEVICE` pick the device, `to_device` /
#   `to_numpy` move arrays, and `manual_seed` gives the same weights on both.
# - Without CuPy or a GPU, asking for CUDA is a one-line `RuntimeError` that says which is missing;
#   `cuda_available()` and `cuda_unavailable_reason()` let code (and this notebook) check first.
# - CPU and GPU results agree to float32 rounding, not bit for bit: the order of the sums differs.
#   One-multiply kernels like NF4 dequantization match exactly.
# - Every GPU op pays a ~5–10 µs launch. Tiny models are launch-bound; GPUs pay off on big arrays, and
#   fusing work into one kernel (as minilora does for NF4) cuts launches and memory traffic.
# - On the CPU, the training loop uses the cores by data parallelism: one micro-batch per thread on a
#   replica sharing the weights, gradients weighted by target counts and summed.
