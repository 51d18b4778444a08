"""Data parallelism on the cores of one CPU: ``DataParallel(model)`` splits a batch into
micro-batches that run forward, and later backward, at the same time in separate threads.

This is what PyTorch's DistributedDataParallel does across GPUs (Li et al. 2020, "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training"), shrunk to one machine, and used
the same way: wrap the model, call the wrapper as you would call the model, call ``backward()`` on
its loss. The training loop (``train.train``) opts into it; the step itself still reads
``loss = model(...).loss; loss.backward()``.

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
micro-batches hand off twice per step (forward, backward). Inside each one, BLAS and minilora's
kernels stay on one thread (``parallel.single_threaded``); NumPy releases the GIL inside its ufuncs
and matmuls, so the threads really compute at once (only the Python between the ops takes turns).
A micro-batch's activations also fit a core's cache better than the whole batch's. The step time is
measured in ``benchmarks/bench_train_step.py``, ``bench_lora_step.py`` and ``bench_data_parallel.py``
(docs/benchmarks.md).

Randomness (dropout): each micro-batch draws from its own generator, spawned from
``backend.rng()`` (spawning does not advance it), so masks never depend on thread timing.
Memory: activations are those of the whole batch, as without the split; a trained parameter's
gradient exists once per replica until they are summed (LoRA factors: kilobytes; full fine-tuning:
one extra copy of the gradients per extra thread).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from . import backend, settings
from .fast import parallel
from .nn import Module, Parameter
from .tensor import Tensor, is_grad_enabled


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


@dataclass
class DataParallelOutput:
    """What a split call returns: ``loss``, the full batch's mean loss (a Tensor whose ``backward()``
    runs the micro-batches' backwards); ``logits`` is None (joining the micro-batches' (b, T, vocab)
    logits would copy the whole batch's, every step, for a loop that reads only the loss; call the
    model itself for logits)."""
    loss: Tensor
    logits: None = None


class DataParallel(Module):
    """``DataParallel(model)(input_ids, labels=..., attention_mask=...)``: the model's forward, the
    batch split over CPU threads when that helps; ``.loss.backward()`` then runs the micro-batches'
    backwards in those threads and adds their gradients into ``model``'s parameters.

    ``module`` is the wrapped model (as in torch's DistributedDataParallel); ``train()``, ``eval()``
    and ``parameters()`` reach it. A call splits the batch into ``n`` micro-batches, one per thread
    (n = ``n_threads``, default ``parallel.num_threads()``, at most the batch size), when all of
    these hold: it reads ``(input_ids, labels=..., attention_mask=...)`` (the mask optional, no other
    argument: each micro-batch gets its rows of these three only), the ids are a 2-D NumPy batch of
    two or more rows and the labels are not None, grad is
    on and the model has a trainable parameter, ``settings.reference_mode()`` is off, n >= 2, and
    (unless ``n_threads`` is given) each micro-batch holds at least
    ``settings.MIN_TOKENS_PER_MICRO_BATCH`` tokens, else fewer, fuller micro-batches are used. Labels
    are shifted inside the model as in transformers, so micro-batch k has
    ``n_k = (labels[k][:, 1:] != ignore_index).sum()`` targets and its loss is weighted n_k / N; a
    micro-batch with no target is left out. Otherwise (a GPU, one thread, no grad, too few tokens,
    reference mode, every target in one micro-batch) the call is exactly ``model(*args, **kwargs)``.

    A split call returns a ``DataParallelOutput``. Its loss's ``backward(grad)`` runs each
    replica's backward with upstream gradient ``grad * n_k / N``, in the threads, with BLAS and
    minilora's kernels on one thread each, then adds the replicas' gradients into the model's
    parameters in micro-batch order. The graph goes with the first backward (no ``retain_graph``).
    If a module reaches a parameter of the original model instead of its replica's (a layer kept in
    a plain list), two threads would write one gradient: that backward raises ``RuntimeError``.
    """

    def __init__(self, module: Module, n_threads: int | None = None, ignore_index: int = -100):
        super().__init__()
        self.module = module
        self.n_threads = n_threads
        self.ignore_index = ignore_index

    def forward(self, *args, **kwargs):
        split = self._plan(*args, **kwargs)
        if split is None:
            return self.module(*args, **kwargs)
        return DataParallelOutput(loss=self._split_forward(*split))

    # ------------------------------------------------------------------ when and how to split
    def _plan(self, *args, **kwargs):
        """(ids, labels, mask, slices, counts) of a split call, or None for the plain call."""
        if len(args) != 1 or "labels" not in kwargs or set(kwargs) - {"labels", "attention_mask"}:
            return None
        if settings.reference_mode() or not is_grad_enabled():
            return None
        input_ids, labels, attention_mask = args[0], kwargs["labels"], kwargs.get("attention_mask")
        if labels is None or backend.get_xp(_data(input_ids)) is not np:
            return None
        ids = _host_array(input_ids)
        n = parallel.num_threads() if self.n_threads is None else self.n_threads
        if n < 2 or ids.ndim != 2 or ids.shape[0] < 2:
            return None
        if self.n_threads is None and ids.size < n * settings.MIN_TOKENS_PER_MICRO_BATCH:
            n = ids.size // settings.MIN_TOKENS_PER_MICRO_BATCH     # fewer, fuller micro-batches
            if n < 2:
                return None
        if not any(p.requires_grad for p in self.module.parameters()):
            return None
        lab, mask = _host_array(labels), _host_array(attention_mask)
        if lab.shape != ids.shape:
            raise ValueError(f"labels have shape {lab.shape} but input_ids {ids.shape}; they must match")
        slices = micro_batches(ids.shape[0], n)
        counts = [int((lab[sl, 1:] != self.ignore_index).sum()) for sl in slices]
        work = [(sl, c) for sl, c in zip(slices, counts) if c > 0]
        if len(work) < 2:            # no target at all, or every target in one micro-batch
            return None
        return ids, lab, mask, [sl for sl, _ in work], [c for _, c in work]

    def _split_forward(self, ids, lab, mask, slices, counts) -> Tensor:
        """Run the micro-batches' forwards in threads; return the weighted sum of their losses as a
        graph node whose backward runs theirs."""
        trained = [p for p in self.module.parameters() if p.requires_grad]
        replicas = [replicate(self.module) for _ in slices]
        generators = backend.rng().spawn(len(slices))
        total = sum(counts)
        weights = [c / total for c in counts]

        def forward(i):
            with parallel.single_threaded(), backend.use_rng(generators[i]):
                sl = slices[i]
                return model_loss(replicas[i][0], ids[sl], lab[sl], None if mask is None else mask[sl])

        losses = parallel.run_chunks(forward, list(range(len(slices))), blas_one_thread=True)
        value = sum(loss.item() * w for loss, w in zip(losses, weights))
        out = Tensor._result(np.asarray(value, dtype=losses[0].data.dtype), tuple(trained),
                             "data_parallel")

        def backward_one(i):
            upstream = np.asarray(float(out.grad) * weights[i], dtype=losses[i].data.dtype)
            with parallel.single_threaded():
                losses[i].backward(grad=upstream)

        def _backward():
            before = [p.grad for p in trained]
            parallel.run_chunks(backward_one, list(range(len(slices))), blas_one_thread=True)
            for p, old in zip(trained, before):
                if p.grad is not old:
                    raise RuntimeError(
                        "data_parallel: a module reached a parameter of the original model instead "
                        "of its replica's (a layer kept in a plain list or dict?); register it as a "
                        "module attribute, or train with data_parallel=False")
                grads = [g for g in (mapping[id(p)].grad for _, mapping in replicas) if g is not None]
                if grads:
                    g = grads[0]                           # the replica's own array: add in place
                    for other in grads[1:]:
                        g += other
                    p._accum(g, fresh=True)

        out._set_backward(_backward)
        return out


def forward_backward(model: Module, input_ids, labels=None, attention_mask=None,
                     ignore_index: int = -100, n_threads: int | None = None) -> Tensor:
    """``loss = DataParallel(model)(input_ids, labels=labels).loss; loss.backward()``, as one call
    for benchmarks and notebooks; returns the loss, detached (its graph is gone).

    ``labels`` default to ``input_ids``; ``n_threads`` as in ``DataParallel`` (given, it skips the
    minimum token count). A loss that is not finite (divergence, or no target at all) runs no
    backward and leaves every gradient as it was, as the training loop's check does.
    """
    labels = input_ids if labels is None else labels
    kwargs = {"labels": labels}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    wrapper = DataParallel(model, n_threads=n_threads, ignore_index=ignore_index)
    loss = _loss_of(wrapper(input_ids, **kwargs))
    if math.isfinite(loss.item()):
        loss.backward()
    return loss.detach()


def model_loss(model, input_ids, labels, attention_mask=None) -> Tensor:
    """``model(input_ids, labels=labels[, attention_mask=...]).loss``, or a clear error if the model
    computes no loss."""
    kwargs = {"labels": labels}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    return _loss_of(model(input_ids, **kwargs))


def _loss_of(output) -> Tensor:
    loss = getattr(output, "loss", None)
    if loss is None:
        raise ValueError("model(input_ids, labels=...) returned no .loss; the training loop needs a "
                         "model whose forward computes the loss from labels")
    return loss


__all__ = ["DataParallel", "DataParallelOutput", "forward_backward", "model_loss", "replicate",
           "micro_batches"]
