"""Optimizers, gradient clipping and learning-rate schedules, with PyTorch's formulas and defaults.

* ``SGD`` (with optional momentum) and ``AdamW`` (Loshchilov & Hutter 2019, "Decoupled Weight Decay
  Regularization": Adam's update plus a weight decay applied to the weights directly, not through the
  gradient; Kingma & Ba 2015 for Adam's bias-corrected moments).
* State (momentum buffers, Adam's two moments) exists only for parameters that require grad. This is
  the memory half of LoRA's saving: a frozen 7B base needs no optimizer state at all, only the
  adapters do (2 x 4 bytes per trainable parameter for AdamW).
* ``clip_grad_norm_`` rescales all gradients together so their global L2 norm is at most max_norm;
  ``global_grad_norm`` is that norm, computed without overflow.
* ``get_cosine_schedule_with_warmup`` / ``WarmupCosine``: linear warm-up then a half-cosine decay,
  the schedule of transformers' function of the same name.

Each ``step`` is a loop over parameters (never over elements) whose body is the update rule written
as the equation, on whichever array module holds the arrays (NumPy or CuPy): that is the reference,
what runs in ``minilora.reference()``. Otherwise the step runs its fast twin, ``fast/optim.py``
(parameters shared among CPU threads; AdamW's update in cache-sized pieces), equal up to float32
rounding. ``state_dict()`` gives host NumPy arrays, in torch's layout.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend, settings
from .fast import optim as fast_optim
from .tensor import Tensor, no_grad


def _as_param_groups(params, defaults: dict) -> list:
    """Turn an iterable of Tensors, or of dicts {"params": [...], **overrides}, into param groups."""
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list; pass model.parameters() (or the "
                         "trainable ones)")
    if not isinstance(params[0], dict):
        params = [{"params": params}]
    groups = []
    for g in params:
        ps = list(g["params"])
        for p in ps:
            if not isinstance(p, Tensor):
                raise ValueError(f"optimizer params must be Tensors/Parameters, got {type(p).__name__}")
        unknown = set(g) - set(defaults) - {"params"}
        if unknown:
            raise ValueError(f"unknown optimizer option(s) {sorted(unknown)}; known: {sorted(defaults)}")
        group = dict(defaults)
        group.update({k: v for k, v in g.items() if k != "params"})
        group["params"] = ps
        group.setdefault("initial_lr", group["lr"])
        groups.append(group)
    return groups


class Optimizer:
    """Base class: ``param_groups`` (dicts with "params" and hyperparameters), per-parameter ``state``
    (created lazily, only for parameters that require grad and have a gradient), ``zero_grad``,
    ``state_dict`` / ``load_state_dict``."""

    _state_keys: tuple = ()

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        self.param_groups = _as_param_groups(params, defaults)
        self.state: dict = {}        # id(param) -> {"step": int, buffers...}

    def _params(self):
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p

    def _trainable(self):
        """(group, param) for every parameter the next step will update."""
        for group, p in self._params():
            if p.requires_grad and p.grad is not None:
                yield group, p

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients (``p.grad = None``, as torch's default)."""
        for _, p in self._params():
            p.grad = None

    def step(self) -> None:
        """Update every trainable parameter that has a gradient, one at a time (``_update``); outside
        ``minilora.reference()`` the parameters are shared among CPU threads
        (``fast.optim.run_per_parameter``: each is still updated by one thread, by ``_update``)."""
        work = []
        for group, p in self._trainable():
            state = self.state.get(id(p))
            if state is None:
                state = self.state[id(p)] = self._init_state(p)
            state["step"] += 1
            work.append((p, p.grad.astype(p.data.dtype, copy=False), state, group))
        with no_grad():
            if settings.reference_mode():
                for p, g, state, group in work:
                    self._update(p, g, state, group)
            else:
                fast_optim.run_per_parameter(self._update, work)

    def _init_state(self, p) -> dict:
        xpmod = backend.get_xp(p.data)
        return {"step": 0, **{k: xpmod.zeros_like(p.data) for k in self._state_keys}}

    def _update(self, p, g, state: dict, group: dict) -> None:
        raise TypeError(f"{type(self).__name__} defines no update rule")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """{"state": {index: {"step", buffers as NumPy}}, "param_groups": [{hyper..., "params":
        [indices]}]}: torch's layout, parameters numbered in param_groups order."""
        index, groups = 0, []
        state = {}
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                st = self.state.get(id(p))
                if st is not None:
                    state[index] = {k: (backend.to_numpy(v).copy() if k != "step" else int(v))
                                    for k, v in st.items()}
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(own["params"]) for g, own in zip(groups, self.param_groups)):
            raise ValueError("optimizer state_dict has a different number of parameter groups or "
                             "parameters than this optimizer; build it over the same parameters")
        params = [p for _, p in self._params()]
        self.state = {}
        for idx, st in state_dict["state"].items():
            p = params[int(idx)]
            xpmod = backend.get_xp(p.data)
            new = {}
            for k, v in st.items():
                if k == "step":
                    new[k] = int(v)
                    continue
                if tuple(np.shape(v)) != p.shape:
                    raise ValueError(f"optimizer state {k!r} of parameter {idx} has shape "
                                     f"{tuple(np.shape(v))}, expected {p.shape}")
                new[k] = xpmod.asarray(backend.to_device(np.asarray(v), backend.device_of(p.data)),
                                       dtype=p.data.dtype)
            self.state[id(p)] = new
        for own, g in zip(self.param_groups, groups):
            own.update({k: v for k, v in g.items() if k != "params"})


class SGD(Optimizer):
    """p -= lr * (g + weight_decay p), with optional (heavy-ball) momentum, as torch.optim.SGD."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD needs lr, momentum, weight_decay >= 0, got {lr}, {momentum}, "
                             f"{weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _init_state(self, p) -> dict:
        return {"step": 0}   # the momentum buffer is created from the first gradient

    def _update(self, p, g, state, group) -> None:
        """One parameter: g <- g + λ·p; with momentum μ, buf <- μ·buf + (1 − dampening)·g (buf = g on
        the first step) and g <- g + μ·buf (Nesterov) or buf; then p <- p − lr·g."""
        lr, mu, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        if weight_decay:
            g = g + weight_decay * p.data                     # L2 through the gradient (coupled)
        if mu:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf[...] = mu * buf + (1.0 - group["dampening"]) * g
            g = g + mu * buf if group["nesterov"] else buf
        p.data -= lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, Algorithm 2), with
    torch.optim.AdamW's defaults. For each parameter p with gradient g, at step t = 1, 2, ...:

        m  <- β1·m + (1 − β1)·g                  the first moment, a running mean of g
        v  <- β2·v + (1 − β2)·g²                 the second moment, a running mean of g²
        m̂  =  m / (1 − β1ᵗ),  v̂ = v / (1 − β2ᵗ)   bias-corrected (m and v start at zero)
        p  <- p − lr·(m̂ / (√v̂ + ε) + λ·p)       λ = weight_decay, applied to p directly: the decay
                                                 is not seen by the moments ("decoupled")

    ``_update`` is those lines, for one parameter. Outside ``minilora.reference()`` it runs
    ``fast.optim.adamw_update_`` instead: torch's arrangement of the same arithmetic, in place and
    in cache-sized pieces (same m and v bits; p within float32 rounding).
    """

    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW needs lr, eps, weight_decay >= 0 and betas in [0, 1); got lr={lr},"
                             f" betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _update(self, p, g, state, group) -> None:
        """One AdamW step of parameter ``p`` (the class docstring's lines), in place on p.data and
        on the moments in ``state`` (``exp_avg`` = m, ``exp_avg_sq`` = v; ``step`` = t)."""
        lr, (beta1, beta2), eps, weight_decay = (group["lr"], group["betas"], group["eps"],
                                                 group["weight_decay"])
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        if not settings.reference_mode():
            fast_optim.adamw_update_(p.data, g, m, v, t, lr, beta1, beta2, eps, weight_decay)
            return
        xpmod = backend.get_xp(p.data)
        m[...] = beta1 * m + (1 - beta1) * g
        v[...] = beta2 * v + (1 - beta2) * g**2
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        p.data -= lr * (m_hat / (xpmod.sqrt(v_hat) + eps) + weight_decay * p.data)


class NonFiniteGradientError(RuntimeError):
    """The gradients' global norm is inf or NaN, so they cannot be clipped (raised by
    ``clip_grad_norm_(..., error_if_nonfinite=True)``, as torch raises its RuntimeError)."""


def _param_norm(g) -> float:
    """L2 norm of one gradient array, as a Python float, without overflow.

    The float32 dot product overflows to inf once an element passes ~1.8e19 (its square passes
    float32's max, 3.4e38), although the norm itself may be finite. Then the array is divided by
    its largest magnitude m first (every element in [-1, 1], so the dot is at most g.size) and the
    norm is m·sqrt(dot). An array holding inf or NaN keeps its inf or NaN norm, as torch reports it.
    """
    xpmod = backend.get_xp(g)
    flat = g.ravel()
    sq = float(xpmod.vdot(flat, flat))
    if math.isfinite(sq):
        return math.sqrt(sq)
    m = float(xpmod.abs(flat).max())
    if not math.isfinite(m):
        return m                                  # inf, or NaN (max propagates NaN)
    scaled = flat / flat.dtype.type(m)
    return m * math.sqrt(float(xpmod.vdot(scaled, scaled)))


def global_grad_norm(parameters) -> float:
    """The L2 norm of all gradients together, sqrt(Σ_p ‖g_p‖²), as a Python float; parameters without
    a gradient are skipped (0.0 when none has one). Summed in float64 from per-parameter norms that
    do not overflow (``_param_norm``), so finite gradients near float32's max give a finite norm.
    NaN if any gradient holds a NaN, else inf if any holds an inf."""
    norms = [_param_norm(p.grad) for p in parameters if p.grad is not None]
    if any(math.isnan(n) for n in norms):
        return math.nan
    if any(math.isinf(n) for n in norms):
        return math.inf
    top = max(norms, default=0.0)
    if top == 0.0:
        return 0.0
    # divide by the largest norm before squaring: float64 then cannot overflow either
    return top * math.sqrt(sum((n / top) ** 2 for n in norms))


def clip_grad_norm_(parameters, max_norm: float, eps: float = 1e-6,
                    error_if_nonfinite: bool = False) -> float:
    """Scale every gradient by min(1, max_norm / (total_norm + eps)); return the total L2 norm
    (before clipping), as torch.nn.utils.clip_grad_norm_. Parameters without a gradient are skipped.

    The norm is ``global_grad_norm``'s: it does not overflow, so gradients near float32's max
    (3e38) are clipped where torch's float32 norm overflows to inf and zeroes them all.
    When the norm is inf or NaN (a gradient holds an inf or a NaN) it is returned as torch returns
    it; with ``error_if_nonfinite=True`` a ``NonFiniteGradientError`` (a RuntimeError, as torch's) is
    raised instead. Unlike torch, the gradients are then left unscaled: scaling by a non-finite norm
    turns every gradient into 0 or NaN, which hides which one broke (``train`` stops or skips such a
    step before the optimizer sees it).
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    total = global_grad_norm(params)
    if not math.isfinite(total):
        if error_if_nonfinite:
            raise NonFiniteGradientError(
                f"the total gradient norm is {total}, so the gradients cannot be clipped; find the "
                "inf/NaN source, or pass error_if_nonfinite=False to get the norm back instead")
        return total
    coef = max_norm / (total + eps)
    if coef < 1.0:
        for p in params:  # out of place: a gradient array may be shared with user code
            dtype = p.grad.dtype.type
            if coef >= np.finfo(p.grad.dtype).tiny:
                p.grad = p.grad * dtype(coef)
            else:   # coef is subnormal in the gradient's dtype (total near its max): scale in float64
                p.grad = (p.grad.astype(np.float64) * coef).astype(p.grad.dtype)
    return total


# ============================================================== schedules
class WarmupCosine:
    """lr multiplier for step s: s / warmup during warm-up, then 0.5 (1 + cos(pi * 2 * cycles *
    progress)) floored at ``min_ratio``; transformers' ``get_cosine_schedule_with_warmup`` lambda."""

    def __init__(self, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5,
                 min_ratio: float = 0.0):
        if num_warmup_steps < 0 or num_training_steps < 1:
            raise ValueError(f"need num_warmup_steps >= 0 and num_training_steps >= 1, got "
                             f"{num_warmup_steps} and {num_training_steps}")
        self.warmup, self.total = int(num_warmup_steps), int(num_training_steps)
        self.num_cycles, self.min_ratio = float(num_cycles), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return float(step) / float(max(1, self.warmup))
        progress = float(step - self.warmup) / float(max(1, self.total - self.warmup))
        cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * self.num_cycles * 2.0 * progress)))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine


class LambdaLR:
    """Set each group's lr to initial_lr * lr_lambda(step), as torch.optim.lr_scheduler.LambdaLR:
    applied for step 0 at construction, then once per ``step()`` (call it after optimizer.step())."""

    def __init__(self, optimizer: Optimizer, lr_lambda):
        self.optimizer = optimizer
        self.lr_lambda = lr_lambda
        self.last_epoch = 0
        self._apply()

    def _apply(self) -> None:
        factor = self.lr_lambda(self.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = int(state["last_epoch"])
        self._apply()


def get_cosine_schedule_with_warmup(optimizer: Optimizer, num_warmup_steps: int,
                                    num_training_steps: int, num_cycles: float = 0.5) -> LambdaLR:
    """Linear warm-up from 0 to the optimizer's lr, then cosine decay to 0 (transformers' schedule)."""
    return LambdaLR(optimizer, WarmupCosine(num_warmup_steps, num_training_steps, num_cycles))


def get_constant_schedule(optimizer: Optimizer) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: 1.0)


__all__ = ["Optimizer", "SGD", "AdamW", "clip_grad_norm_", "global_grad_norm",
           "NonFiniteGradientError", "WarmupCosine", "LambdaLR", "get_cosine_schedule_with_warmup",
           "get_constant_schedule"]
