"""Gradient checkpointing: keep a block's input instead of its activations, recompute them in backward.

Chen, Xu, Zhang & Guestrin (2016), "Training Deep Nets with Sublinear Memory Cost". Backward needs
the activations that forward computed (a matmul's input, a softmax's output, ...): ordinarily every
op keeps them in its backward closure, so a model's whole forward stays alive until ``backward()``
reaches it. ``checkpoint(fn, *inputs)`` keeps only ``fn``'s inputs: it runs ``fn`` under
``no_grad()`` (no graph, so each intermediate array is freed as soon as the next op has read it) and
returns the output as ONE graph node. When ``backward()`` reaches that node, its closure

1. runs ``fn`` again on detached copies of the inputs, with the graph on (``enable_grad()``), with
   the random generator replayed from the state it had in forward (so dropout draws the same mask)
   and in the same reference/fast mode as forward (``settings.reference_mode()``);
2. calls ``backward(out.grad)`` on that recomputed output: the gradient flows through the block's
   ops into the parameters ``fn`` uses (they accumulate into ``.grad`` exactly as without
   checkpointing; a frozen one gets none, as everywhere in autograd.py) and into the detached
   inputs, whose gradients it then adds into the real inputs.

The block's graph lives only during its own step of the backward, so a model of L blocks keeps L
block inputs plus one block's activations instead of L blocks' activations, at the price of one
more forward of each block: about a third more arithmetic when backward computes weight gradients
(then it costs about two forwards), up to a half more for LoRA, whose backward skips the frozen
weights' gradients (about one forward).
Chen et al. checkpoint every sqrt(L) blocks for O(sqrt(L)) memory; transformers (and
``models/llama.py`` here) checkpoint every decoder layer, whose input is small next to what the layer
keeps. The memory cut and the step time are measured in ``benchmarks/bench_checkpointing.py``
(docs/benchmarks.md, "Gradient checkpointing"); tests/test_checkpointing.py checks that gradients and
loss equal those without checkpointing, bit for bit, and counts the bytes the graph keeps.

Rules for ``fn``: Tensors that need a gradient reach it as ``inputs`` (a non-Tensor input, such as
RoPE tables or a mask array, is passed through as it is), as parameters of ``fn``'s module or as
``params=``; it returns one Tensor; its random numbers come from ``backend.rng()`` (NumPy), the
generator this module replays. The same ops then run in the same order on the same numbers in
forward and in the recomputation, so the recomputed activations are the ones forward computed, bit
for bit. On a GPU, dropout draws its mask from CuPy's own generator (``backend.random_uniform``),
which is not replayed: there, checkpoint only blocks without dropout (LoRA with
``lora_dropout=0``).
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from . import backend, settings
from .autograd import TensorBase, enable_grad, is_grad_enabled, no_grad


def trainable_parameters(fn) -> list:
    """The parameters of ``fn`` that require grad: ``fn`` a Module (anything with ``parameters()``)
    or a bound method of one; [] for a plain function (pass ``params=`` to ``checkpoint`` then)."""
    owner = fn if hasattr(fn, "parameters") else getattr(fn, "__self__", None)
    if owner is None or not hasattr(owner, "parameters"):
        return []
    return [p for p in owner.parameters() if p.requires_grad]


def _generator_snapshot():
    """A copy of the current NumPy generator's state (``backend.rng()``: the thread's own inside
    ``backend.use_rng``), enough to draw the same numbers again later."""
    g = backend.rng()
    return type(g.bit_generator), g.bit_generator.state


def _replayed_generator(snapshot) -> np.random.Generator:
    """A new generator in the snapshot's state: the live one is left where forward moved it."""
    bit_generator_type, state = snapshot
    bits = bit_generator_type()
    bits.state = state
    return np.random.Generator(bits)


def checkpoint(fn, *inputs, params=None):
    """``fn(*inputs)``, keeping only the inputs for backward and recomputing the rest there.

    Returns fn's output Tensor. When grad is on and an input or a parameter requires grad, the
    output is one graph node whose parents are the inputs that require grad and ``params`` (default
    ``trainable_parameters(fn)``); its backward recomputes ``fn`` and backpropagates through it (see
    the module docstring). Otherwise (under ``no_grad()``, or nothing to train) it is exactly
    ``fn(*inputs)``.
    """
    params = trainable_parameters(fn) if params is None else [p for p in params if p.requires_grad]
    grad_inputs = [x for x in inputs if isinstance(x, TensorBase) and x.requires_grad]
    if not is_grad_enabled() or not (grad_inputs or params):
        return fn(*inputs)
    snapshot = _generator_snapshot()      # before fn draws anything
    reference = settings.reference_mode()
    with no_grad():
        y = fn(*inputs)
    if not isinstance(y, TensorBase):
        raise TypeError(f"checkpoint: fn returned {type(y).__name__}; it must return one Tensor")
    out = TensorBase._result(y.data, tuple(grad_inputs) + tuple(params), "checkpoint")
    del y

    def _backward():
        detached = [TensorBase._result_class(x.data, requires_grad=x.requires_grad)
                    if isinstance(x, TensorBase) else x for x in inputs]
        # the process-wide reference flag is switched only when backward runs in the other mode
        mode = settings.reference(reference) if settings.reference_mode() != reference else nullcontext()
        with mode, enable_grad(), backend.use_rng(_replayed_generator(snapshot)):
            recomputed = fn(*detached)
        if recomputed.data.shape != out.data.shape:
            raise RuntimeError("checkpoint: fn's output changed shape between forward and backward; "
                               "fn must compute the same thing from the same inputs")
        if recomputed.requires_grad:
            recomputed.backward(out.grad)
        for x, d in zip(inputs, detached):
            if isinstance(x, TensorBase) and x.requires_grad and d.grad is not None:
                x._accum(d.grad, fresh=True)   # d is ours alone and goes out of scope here

    out._set_backward(_backward)
    return out


__all__ = ["checkpoint", "trainable_parameters"]
