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
# # 01 · Autograd from scratch
#
# LoRA trains two small matrices and leaves the big one alone. To see why that is cheap, we need the
# machine that computes gradients. minilora's `Tensor` is a NumPy array that remembers how it was
# made; `backward()` walks that record in reverse. This notebook:
#
# - builds a small graph and differentiates it **by hand**, then with **autograd**;
# - shows the **topological order** backward uses;
# - follows **broadcasting** into the backward pass (`unbroadcast`);
# - checks gradients numerically with `minilora.testing.gradcheck`, and watches it catch a broken op;
# - plots a function with its autograd derivative, and trains a tiny regression.
#
# Everything runs on the CPU in a few seconds.

# %%
import matplotlib.pyplot as plt
import numpy as np

import minilora
from minilora import Tensor
from minilora import functional as F
from minilora.ops import unbroadcast
from minilora.testing import GradcheckError, gradcheck

minilora.manual_seed(0)
rng = np.random.default_rng(0)
np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. A graph, by hand and by autograd
#
# Take $L = d^2$ with $d = a b + a$. The chain rule, one node at a time:
#
# - $\partial L / \partial d = 2d$;
# - $\partial d / \partial a = b + 1$ (the two paths through $a$ **add up**), $\partial d / \partial b = a$;
# - so $\partial L / \partial a = 2d\,(b + 1)$ and $\partial L / \partial b = 2d\,a$.

# %%
a = Tensor(2.0, requires_grad=True)
b = Tensor(-3.0, requires_grad=True)
c = a * b          # c = -6
d = c + a          # d = -4
L = d * d          # L = 16

by_hand = {"a": 2 * d.item() * (b.item() + 1), "b": 2 * d.item() * a.item()}
L.backward()
print(f"L = {L.item()}")
print(f"dL/da: by hand {by_hand['a']:+.1f}, autograd {a.grad.item():+.1f}")
print(f"dL/db: by hand {by_hand['b']:+.1f}, autograd {b.grad.item():+.1f}")

# %% [markdown]
# ## 2. The topological order
#
# Every op's result keeps its parents (`_prev`) and the op's name (`_op`). `backward()` must visit a
# node only after every node that uses it, so that its gradient is complete before it is passed on:
# a **reverse topological order**. A depth-first search finds one; here is the ten-line version next
# to the library's own (`Tensor._topological_order`, iterative so deep graphs never hit Python's
# recursion limit).

# %%
a = Tensor(2.0, requires_grad=True)
b = Tensor(-3.0, requires_grad=True)
c = a * b
d = c + a
L = d * d
names = {id(a): "a", id(b): "b", id(c): "c", id(d): "d", id(L): "L"}


def topological_order(root):
    order, seen = [], set()

    def visit(node):
        if id(node) not in seen:
            seen.add(id(node))
            for parent in node._prev:       # parents first ...
                visit(parent)
            order.append(node)              # ... then the node itself
    visit(root)
    return order


mine = [names[id(t)] for t in topological_order(L)]
library = [names[id(t)] for t in L._topological_order()]
print("ours:          ", " -> ".join(mine))
print("minilora's:    ", " -> ".join(library))
print("backward visits", " -> ".join(reversed(library)))
for t in L._topological_order():
    parents = [names[id(p)] for p in t._prev]
    print(f"  {names[id(t)]} = " + (f" {t._op} ".join(parents) if parents else "a leaf (no parents)"))

# %% [markdown]
# The same graph drawn by `minilora.viz.draw_graph`, from the `_prev` and `_op` records alone: one box per
# tensor, in the column of its depth (leaves on the left). Each box shows the op, the shape, the value
# and the gradient $\partial L/\partial\,\text{node}$, which `draw_graph` gets from one
# `backward(retain_graph=True)` whose results it reads and then undoes, so the graph stays as it was.

# %%
from minilora import viz

fig = viz.draw_graph(L, names={"a": a, "b": b, "c": c, "d": d, "L": L})
plt.show()

# %% [markdown]
# `a` appears twice in the graph (in `c` and in `d`), yet it is visited once: its gradient is the
# **sum** of what both uses send back (`Tensor._accum` adds with `+=`). Forgetting that sum is a classic
# bug in hand-written backprop.
#
# ## 3. Arrays, broadcasting and `unbroadcast`
#
# A Linear layer on a batch: $y = x W^\top + b$ with $x$ (4, 3), $W$ (2, 3), $b$ (2,), and
# $L = \text{mean}(y^2)$. By hand, with $g = \partial L/\partial y = 2y / N$:
#
# - $\partial L/\partial W = g^\top x$ : (2, 4) @ (4, 3) = (2, 3);
# - $\partial L/\partial x = g W$ : (4, 2) @ (2, 3) = (4, 3);
# - $\partial L/\partial b = \sum_{\text{rows}} g$ : $b$ was **broadcast** over the 4 rows, so the 4 row
#   gradients add up to one (2,) gradient.

# %%
x = Tensor(rng.standard_normal((4, 3)), requires_grad=True)
W = Tensor(rng.standard_normal((2, 3)), requires_grad=True)
b = Tensor(rng.standard_normal(2), requires_grad=True)

y = x @ W.T + b                      # (4, 3) @ (3, 2) + (2,) -> (4, 2)
L = (y * y).mean()
L.backward()

g = 2 * y.data / y.data.size         # dL/dy, (4, 2)
print("dL/dW matches g.T @ x:   ", np.allclose(W.grad, g.T @ x.data))
print("dL/dx matches g @ W:     ", np.allclose(x.grad, g @ W.data))
print("dL/db matches g.sum(0):  ", np.allclose(b.grad, g.sum(axis=0)))
print("shapes: W.grad", W.grad.shape, " x.grad", x.grad.shape, " b.grad", b.grad.shape)

# %% [markdown]
# `minilora.ops.unbroadcast(grad, shape)` is that last step in general: sum over the axes broadcasting
# **added** in front, then over the axes it **stretched** from size 1 (keeping them). Every binary op
# calls it on the way back.

# %%
grad = np.ones((2, 3, 4))                 # the gradient of a (2, 3, 4) result ...
print(unbroadcast(grad, (3, 1)))         # ... for an input of shape (3, 1): 2 * 4 = 8 copies each
print(unbroadcast(grad, (4,)).tolist())  # ... for an input of shape (4,): 2 * 3 = 6 copies each

# %% [markdown]
# ## 4. Checking gradients numerically
#
# An analytic gradient can be checked against central differences,
# $\frac{\partial f}{\partial x_i} \approx \frac{f(x + \varepsilon e_i) - f(x - \varepsilon e_i)}{2 \varepsilon}$,
# accurate to about $\varepsilon^2$. `gradcheck(fn, inputs)` does it for every input element, in
# float64, with a random upstream gradient (so an op that ignores `out.grad` is caught too). It returns
# `True` or raises `GradcheckError` naming the input, the index and both values.

# %%
x = rng.standard_normal((3, 5))
w = rng.standard_normal((5, 4))
checks = {
    "x @ w":                lambda x, w: x @ w,
    "softmax(x @ w)":       lambda x, w: F.softmax(x @ w, axis=-1),
    "silu(x @ w).mean(0)":  lambda x, w: F.silu(x @ w).mean(axis=0),
    "rms_norm(x) @ w":      lambda x, w: F.rms_norm(x) @ w,
}
for name, fn in checks.items():
    print(f"{name:<22} gradcheck -> {gradcheck(fn, [x, w], names=['x', 'w'])}")


# %% [markdown]
# Now a deliberately broken op. Every op in `minilora/ops.py` is written the same way: compute the
# result, then attach a closure that turns `out.grad` into the parents' gradients. Here is $x^3$ with a
# typo in its backward, $3x$ instead of $3x^2$:

# %%
def broken_cube(a: Tensor) -> Tensor:
    out = Tensor._result(a.data ** 3, (a,), "cube")

    def _backward():
        if a.requires_grad:
            a._accum(out.grad * 3 * a.data, fresh=True)   # BUG: d(x^3)/dx is 3 x^2
    out._set_backward(_backward)
    return out


x = rng.standard_normal(4)
try:
    gradcheck(lambda t: broken_cube(t).sum(), [x], names=["x"])
except GradcheckError as err:
    print("gradcheck caught it:\n ", err)

# %% [markdown]
# The message says which input, which element, and both numbers: enough to find the bug. The
# exercises (`notebooks/exercises/`) use the same idea to check your hand-written `lora_grads` and
# `matmul_backward` against autograd.
#
# ## 5. A function and its autograd derivative
#
# Llama's MLP uses SiLU, $\text{silu}(x) = x\,\sigma(x)$, whose derivative is
# $\sigma(x)\,\big(1 + x (1 - \sigma(x))\big)$. One backward pass through 201 points at once gives the
# derivative everywhere (the op is elementwise, so $\partial\,\sum_j f(x_j) / \partial x_i = f'(x_i)$).

# %%
xs = Tensor(np.linspace(-6, 6, 201), requires_grad=True)
ys = F.silu(xs)
ys.sum().backward()

sig = 1 / (1 + np.exp(-xs.data))
formula = sig * (1 + xs.data * (1 - sig))
print("autograd derivative matches the formula:", np.allclose(xs.grad, formula))

# %% [markdown]
# ## 6. A tiny regression trained with autograd
#
# Fit $y = w x + b$ to noisy points from $y = 3x - 1$ by gradient descent: forward, `backward()`,
# step, zero the gradients. Only `w` and `b` require gradients, just as LoRA's A and B are the only
# trainable tensors while $W_0$ stays frozen.

# %%
x_data = rng.uniform(-1, 1, size=64)
y_data = 3 * x_data - 1 + 0.1 * rng.standard_normal(64)
w = Tensor(0.0, requires_grad=True)
b = Tensor(0.0, requires_grad=True)
lr, losses = 0.3, []
for step in range(60):
    pred = w * x_data + b
    loss = ((pred - y_data) ** 2).mean()
    loss.backward()
    losses.append(loss.item())
    w.data -= lr * w.grad                # a plain SGD step
    b.data -= lr * b.grad
    w.grad = b.grad = None               # gradients accumulate: clear them before the next step
print(f"learned w = {w.item():.3f}, b = {b.item():.3f} (true 3, -1); final loss {losses[-1]:.4f}")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
left.plot(xs.data, ys.data, label="silu(x)")
left.plot(xs.data, xs.grad, label="d silu / dx (autograd)")
left.plot(xs.data[::12], formula[::12], "o", ms=4, label="formula")
left.axhline(0, color="grey", lw=0.5)
left.set_xlabel("x")
left.set_title("SiLU and its derivative")
left.legend()
right.plot(losses)
right.set_yscale("log")
right.set_xlabel("step")
right.set_ylabel("mean squared error")
right.set_title("tiny regression, trained with autograd")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What to take away
#
# - A Tensor records its parents and a backward closure; `backward()` runs the closures in reverse
#   topological order, **adding** gradients where a tensor is used twice.
# - Broadcasting in the forward pass means **summing** in the backward pass (`unbroadcast`).
# - `gradcheck` compares with central differences and names the element that disagrees.
# - Tensors with `requires_grad=False` get no gradient at all: that is how LoRA freezes $W_0$
#   (notebook 03).
