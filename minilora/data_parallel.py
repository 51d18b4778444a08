"""Data parallelism on the cores of one CPU: a batch split into micro-batches that run forward and
backward at the same time, in separate threads, with their gradients summed.

This is what PyTorch's DistributedDataParallel does across GPUs (Li et al. 2020, "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training"), shrunk to one machine:

1. ``replicate(model)`` gives each thread a replica of the module tree whose trainable Parameters
   are new leaves *sharing the original arrays* (no weight is copied; frozen parts are not even
   replicated). Each thread's backward adds into its own replica's ``.grad``, so no two threads ever
   write the same gradient array.
2. Each micro-batch's mean loss is weighted by its share of the batch's target tokens, so the
   weighted losses add up to the full batch's mean loss, and the replicas' gradients add up to the
   full batch's gradient (equal up to float32 rounding: the sums run in a different order).
3. The replicas' gradients are added into the model's in micro-batch order, so a seed gives the
   same bits on every run (for a given thread count).

Why: NumPy runs each op on one core. ``minilora.fast.parallel`` splits the big ops across threads, but
that is a hand-off per op, hundreds per training step, and the small ops stay on one core. Whole
micro-batches hand off once per step. Inside each one, BLAS and minilora's kernels stay on one
thread (``parallel.single_threaded``); NumPy releases the GIL inside its ufuncs and matmuls, so
the threads really compute at once (only the Python between the ops takes turns). A micro-batch's
activations also fit a core's cache better than the whole batch's. The step time is measured in
``benchmarks/bench_train_step.py`` and ``bench_lora_step.py``.

Randomness (dropout): each micro-batch draws from its own generator, spawned from
``backend.rng()`` (spawning does not advance it), so masks never depend on thread timing.
Memory: activations are those of the whole batch, as before; a trained parameter's gradient exists
once per replica until they are summed (LoRA factors: kilobytes; full fine-tuning: one extra copy
of the gradients per extra thread).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from . import backend
from .fast import parallel
from .nn import Module, Parameter
from .tensor import Tensor, is_grad_enabled


# Below this many tokens per micro-batch the split does not pay: each thread's Python overhead and
# fixed costs (a replica, and for a 4-bit base its own dequantization of every weight) outweigh the
# halved arithmetic. Measured on the shipped base (2 threads, step time split / plain): LoRA 1.02x at
# 192 tokens per micro-batch, 0.90x at 256, 0.80x at 1024; QLoRA 1.21x at 192, 1.04x at 384,
# 0.96x at 512, 0.87x at 1024.
MIN_TOKENS_PER_MICRO_BATCH = 512


def replicate(module: Module) -> tuple[Module, dict]:
    """A copy of the module tree whose trainable Parameters are new Tensors over the *same* arrays.

    Every module with a trainable Parameter in it or below it is copied shallowly (its plain
    attributes, such as a config, flags or a frozen 4-bit weight, are shared), its ``_parameters``
    and ``_modules`` rebuilt from replicas; a Parameter or module reached twice (tied embeddings) is
    replicated once. A module with nothing trainable below it (a frozen MLP, a LoRA layer's base) is
    not copied at all: no gradient is ever stored in it, so threads may run it together. Returns
    (replica, {id(original parameter): replica parameter}).
    """
    params: dict = {}
    modules: dict = {}
    trains: dict = {}   # id(module) -> it or a module below it holds a trainable Parameter

    def trained(m: Module) -> bool:
        if id(m) not in trains:
            trains[id(m)] = (any(p is not None and p.requires_grad for p in m._parameters.values())
                             or any(trained(c) for c in m._modules.values()))
        return trains[id(m)]

    def param(p: Parameter) -> Parameter:
        if id(p) not in params:
            params[id(p)] = Parameter(p.data, requires_grad=p.requires_grad)   # same array, no copy
        return params[id(p)]

    def copy(m: Module) -> Module:
        if not trained(m):
            return m
        if id(m) in modules:
            return modules[id(m)]
        r = object.__new__(type(m))
        modules[id(m)] = r
        r.__dict__.update(m.__dict__)
        r.__dict__["_parameters"] = OrderedDict((n, None if p is None else param(p))
                                                for n, p in m._parameters.items())
        r.__dict__["_modules"] = OrderedDict((n, copy(c)) for n, c in m._modules.items())
        r.__dict__.update(r._parameters)
        r.__dict__.update(r._modules)
        return r

    return copy(module), params


def micro_batches(batch_size: int, n: int) -> list[slice]:
    """``n`` near-equal slices of ``range(batch_size)`` (fewer if the batch is smaller)."""
    n = max(1, min(n, batch_size))
    bounds = [(i * batch_size + n // 2) // n for i in range(n + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _data(x):
    return x.data if isinstance(x, Tensor) else x


def _host_array(x):
    return None if x is None else np.asarray(_data(x))


def forward_backward(model: Module, input_ids, labels=None, attention_mask=None,
                     ignore_index: int = -100, n_threads: int | None = None) -> Tensor:
    """``loss = model(input_ids, labels=labels).loss; loss.backward()`` for a causal LM batch, with
    the batch split over CPU threads when that helps; returns the loss (detached: its graph is gone).

    Runs as the plain two lines on a GPU, with one thread (``parallel.num_threads()``), when grad is
    off, or when a micro-batch would hold fewer than ``MIN_TOKENS_PER_MICRO_BATCH`` tokens (passing
    ``n_threads`` explicitly skips that last check). Otherwise each of ``n`` micro-batches (n = the
    thread count, at most the batch size) runs on a replica of the model in its own thread.
    Labels are shifted inside the model as in transformers, so micro-batch k has
    ``n_k = (labels[k][:, 1:] != ignore_index).sum()`` targets and its loss is weighted n_k / N.
    A loss that is not finite (divergence, or no target at all) runs no backward and leaves every
    gradient as it was; the training loop then stops with a clear error.
    """
    labels = input_ids if labels is None else labels
    n = parallel.num_threads() if n_threads is None else n_threads
    ids = _host_array(input_ids) if backend.get_xp(_data(input_ids)) is np else None
    if ids is None or n < 2 or ids.ndim != 2 or ids.shape[0] < 2 or not is_grad_enabled():
        return _plain(model, input_ids, labels, attention_mask)
    if n_threads is None and ids.size < n * MIN_TOKENS_PER_MICRO_BATCH:
        n = ids.size // MIN_TOKENS_PER_MICRO_BATCH           # fewer, fuller micro-batches (or none)
        if n < 2:
            return _plain(model, input_ids, labels, attention_mask)
    lab, mask = _host_array(labels), _host_array(attention_mask)
    if lab.shape != ids.shape:
        raise ValueError(f"labels have shape {lab.shape} but input_ids {ids.shape}; they must match")
    slices = micro_batches(ids.shape[0], n)
    counts = [int((lab[sl, 1:] != ignore_index).sum()) for sl in slices]
    total = sum(counts)
    work = [(k, sl) for k, (sl, c) in enumerate(zip(slices, counts)) if c > 0]
    if total == 0 or len(work) < 2:        # nothing to split (or every target in one micro-batch)
        return _plain(model, input_ids, labels, attention_mask)

    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.grad for p in trained]
    replicas = [replicate(model) for _ in work]
    generators = backend.rng().spawn(len(work))

    def run(i):
        k, sl = work[i]
        replica = replicas[i][0]
        with parallel.single_threaded(), backend.use_rng(generators[i]):
            loss = model_loss(replica, ids[sl], lab[sl], None if mask is None else mask[sl])
            weight = counts[k] / total
            value = loss.item()
            if math.isfinite(value):
                loss.backward(grad=np.asarray(weight, dtype=loss.data.dtype))
            return value * weight

    loss = sum(parallel.run_chunks(run, list(range(len(work))), blas_one_thread=True))
    if not math.isfinite(loss):              # leave every gradient as it was; the caller decides
        return Tensor(np.asarray(loss, dtype=np.float32))

    for p, old in zip(trained, before):
        if p.grad is not old:
            raise RuntimeError("data_parallel: a module reached a parameter of the original model "
                               "instead of its replica's (a layer kept in a plain list or dict?); "
                               "register it as a module attribute, or set MINILORA_NUM_THREADS=1")
        grads = [g for g in (mapping[id(p)].grad for _, mapping in replicas) if g is not None]
        if grads:
            g = grads[0]                                   # the replica's own array: add in place
            for other in grads[1:]:
                g += other
            p._accum(g, fresh=True)
    return Tensor(np.asarray(loss, dtype=np.float32))


def model_loss(model, input_ids, labels, attention_mask=None) -> Tensor:
    """``model(input_ids, labels=labels[, attention_mask=...]).loss``, or a clear error if the model
    computes no loss."""
    kwargs = {"labels": labels}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    loss = getattr(model(input_ids, **kwargs), "loss", None)
    if loss is None:
        raise ValueError("model(input_ids, labels=...) returned no .loss; the training loop needs a "
                         "model whose forward computes the loss from labels")
    return loss


def _plain(model, input_ids, labels, attention_mask) -> Tensor:
    loss = model_loss(model, input_ids, labels, attention_mask)
    if math.isfinite(loss.item()):
        loss.backward()
    return loss.detach()


__all__ = ["forward_backward", "model_loss", "replicate", "micro_batches"]
