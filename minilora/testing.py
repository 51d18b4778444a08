"""Gradient checking by central differences, for tests and classroom exercises.

``gradcheck(fn, inputs)`` compares the gradient that autograd computes with the one obtained by
nudging every input element by ±eps and watching the output move: (f(x+eps) - f(x-eps)) / (2 eps).
Everything runs in float64, where that difference is accurate to about 1e-10; a mismatch therefore
means a wrong backward, not rounding. A random upstream gradient (not just ``.sum()``) is used, so
that a backward which ignores ``out.grad`` is caught too.
"""
from __future__ import annotations

import numpy as np

from . import backend
from .tensor import Tensor


class GradcheckError(AssertionError):
    """Raised by gradcheck with the input, the element, and both gradients named."""


def _to_float64_tensor(x) -> Tensor:
    data = x.data if isinstance(x, Tensor) else x
    xpmod = backend.get_xp(data) if not isinstance(data, (list, float, int)) else np
    return Tensor(xpmod.asarray(data, dtype=np.float64), requires_grad=True)


def gradcheck(fn, inputs, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-3,
              seed: int = 0, names=None) -> bool:
    """Check autograd's gradients of ``fn(*inputs)`` against central differences, in float64.

    ``inputs`` are arrays or Tensors (converted to float64 leaves that require grad); ``fn`` returns a
    Tensor of any shape. Returns True, or raises GradcheckError naming the input, the index, the
    analytic and the numeric value. ``names`` optionally labels the inputs in that message.
    """
    tensors = [_to_float64_tensor(x) for x in inputs]
    names = list(names) if names is not None else [f"input {i}" for i in range(len(tensors))]
    out = fn(*tensors)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(out).__name__}")
    xpmod = backend.get_xp(out.data)
    if out.dtype != np.float64:
        raise GradcheckError(f"gradcheck: fn returned {out.dtype}, not float64; an op dropped the "
                             "input's precision (a float32 constant or cast inside fn?)")
    upstream = xpmod.asarray(np.random.default_rng(seed).standard_normal(out.shape))

    def objective() -> float:  # L = sum(fn(x) * upstream): its gradient wrt fn(x) is `upstream`
        with_no_graph = fn(*[Tensor(t.data) for t in tensors])
        return float((with_no_graph.data * upstream).sum())

    out.backward(upstream)
    for t, name in zip(tensors, names):
        analytic = np.zeros(t.shape) if t.grad is None else backend.to_numpy(t.grad)
        flat = t.data.reshape(-1)  # a view: nudging it nudges t.data
        for i in range(flat.size):
            orig = float(flat[i])
            flat[i] = orig + eps
            f_plus = objective()
            flat[i] = orig - eps
            f_minus = objective()
            flat[i] = orig
            numeric = (f_plus - f_minus) / (2 * eps)
            got = float(analytic.reshape(-1)[i])
            if not abs(got - numeric) <= atol + rtol * abs(numeric):
                index = np.unravel_index(i, t.shape) if t.shape else ()
                hint = " (autograd gave no gradient at all for this input)" if t.grad is None else ""
                raise GradcheckError(
                    f"gradient mismatch for {name} (shape {t.shape}) at index {tuple(int(j) for j in index)}: "
                    f"analytic {got:.8g} vs numeric {numeric:.8g} "
                    f"(|diff| {abs(got - numeric):.3g} > atol {atol:g} + rtol {rtol:g}*|numeric|){hint}")
    return True
