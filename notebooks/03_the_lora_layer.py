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
# # 03 · The LoRA layer
#
# > W = W₀ + B · A · (α / r), where W₀ is frozen, A and B are trainable, r is rank, and α is a scaling
# > factor. — *What is LoRA?*
#
# One Linear layer, taken apart. This notebook:
#
# - computes $h = W_0 x + \frac{\alpha}{r} B A x$ **by hand** and with `minilora.lora.LoraLinear`;
# - shows why **$B$ starts at zero** (and what goes wrong if $A$ does too);
# - shows **dropout** acting on the adapter's input only;
# - **derives** $\partial L/\partial A$ and $\partial L/\partial B$, checks them against autograd and
#   `gradcheck`, and shows that the frozen $W_0$ gets **no gradient at all**;
# - compares the scalings **$\alpha/r$ and $\alpha/\sqrt{r}$** (rsLoRA) across ranks $r = 1 \dots 64$.
#
# Shapes follow PyTorch and PEFT: $W_0$ is (out, in), $A$ is (r, in), $B$ is (out, r); a batch of
# inputs is a matrix $X$ (N, in) whose rows are the $x$'s, so the layer computes
# $H = X W_0^\top + s\,(X A^\top) B^\top$ with $s = \alpha / r$.

# %%
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest (set before NumPy loads)

import matplotlib.pyplot as plt
import numpy as np

import minilora
from minilora import Tensor, memory, nn
from minilora.lora import LoraLinear, merge
from minilora.lora.fused import lora_linear
from minilora.optim import SGD
from minilora.testing import gradcheck

FAST = os.environ.get("MINILORA_FAST") == "1"   # smaller sweep for quick CI runs
minilora.manual_seed(0)
rng = np.random.default_rng(0)
np.set_printoptions(precision=4, suppress=True)


def lora_layer(in_features, out_features, r, lora_alpha, **kw):
    # A LoraLinear around a fresh Linear, with one active adapter called "default".
    layer = LoraLinear(nn.Linear(in_features, out_features), module_name="demo")
    layer.update_layer("default", r=r, lora_alpha=lora_alpha, **kw)
    layer.set_adapter("default")
    return layer


# %% [markdown]
# ## 1. By hand and with the library
#
# A layer with 6 inputs, 5 outputs, rank $r = 2$ and $\alpha = 4$, so $s = 2$. `init_lora_weights=False`
# draws $B$ at random too (a "trained" adapter; section 2 is about the real initialisation).

# %%
layer = lora_layer(6, 5, r=2, lora_alpha=4, init_lora_weights=False)
W0 = layer.base_layer.weight.data            # (out, in) = (5, 6), frozen
A = layer.lora_A["default"].weight.data      # (r, in)   = (2, 6)
B = layer.lora_B["default"].weight.data      # (out, r)  = (5, 2)
s = layer.scaling["default"]                 # alpha / r = merge.scaling(4, 2)
X = rng.standard_normal((3, 6)).astype(np.float32)   # a batch of 3 inputs, (N, in)

by_hand = X @ W0.T + s * (X @ A.T) @ B.T     # (3, 6)@(6, 5) + (3, 6)@(6, 2)@(2, 5) -> (3, 5)
library = layer(Tensor(X)).numpy()
merged = X @ merge.merge_weight(W0, A, B, lora_alpha=4, r=2).T   # one matrix, W0 + ΔW

print(f"s = alpha/r = {s}  (merge.scaling: {merge.scaling(4, 2)}; rsLoRA would use {merge.scaling(4, 2, use_rslora=True):.4f})")
print("ΔW by hand == merge.delta_weight:", np.allclose(s * B @ A, layer.get_delta_weight("default")))
print("layer(X) == by hand:            ", np.allclose(library, by_hand, atol=1e-6))
print("layer(X) == X @ (W0 + ΔW)^T:    ", np.allclose(library, merged, atol=1e-6))
print("rank of ΔW:", np.linalg.matrix_rank(layer.get_delta_weight("default")), "(at most r = 2)")

# %% [markdown]
# The layer never forms the (out, in) matrix $BA$: it squeezes $x$ to $r$ numbers with $A$ and
# expands them with $B$, $r\,(\text{in} + \text{out})$ multiply-adds per input instead of
# $\text{in}\cdot\text{out}$. The same count is the number of trainable parameters; for the article's
# 8192×8192 layer at $r = 16$:

# %%
full, lora = memory.linear_weight_parameters(8192, 8192), memory.lora_linear_parameters(8192, 8192, 16)
print(f"W0: {full:,} parameters; A and B at r=16: {lora:,} ({full / lora:.0f}x fewer)")

# %% [markdown]
# The layer drawn to scale by `minilora.viz.draw_lora_layer`, for the shipped base model's `q_proj`
# (128 × 128, notebook 02) at $r = 8$, $\alpha = 16$: each box is as wide as its matrix has columns and
# as tall as it has rows, and the labels carry the parameter counts from `minilora.memory`.

# %%
from minilora import viz

fig = viz.draw_lora_layer(128, 128, r=8, alpha=16)
plt.show()

# %% [markdown]
# ## 2. Initialisation: why $B = 0$
#
# > We randomly initialize A from a Gaussian and set B to zero (so at the start, LoRA contributes nothing).
#
# PEFT's default (`init_lora_weights=True`) draws $A \sim U(-1/\sqrt{\text{in}}, 1/\sqrt{\text{in}})$,
# the default of a Linear layer, and sets $B = 0$. Then $\Delta W = BA = 0$: the adapted model computes
# **exactly** what the pretrained model computes, so fine-tuning starts from the pretrained behaviour,
# not from a random perturbation of it.

# %%
layer = lora_layer(6, 5, r=2, lora_alpha=4)            # init_lora_weights=True: A random, B = 0
A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
print("A: max |a| =", float(np.abs(A).max()), "<= 1/sqrt(in) =", round(1 / np.sqrt(6), 4))
print("B is all zero:", not B.any())
h_lora = layer(Tensor(X)).numpy()
h_base = layer.base_layer(Tensor(X)).numpy()
print("LoRA output == base output, bit for bit:", np.array_equal(h_lora, h_base))

# %% [markdown]
# Why not both zero? Because the gradients (derived in section 4) are
#
# $$\frac{\partial L}{\partial B} = s\,G^\top (X A^\top), \qquad \frac{\partial L}{\partial A} = s\,(G B)^\top X,$$
#
# with $G = \partial L / \partial H$. Each factor's gradient goes through the **other** factor. With
# $B = 0$ and $A$ random, $\partial L/\partial A = 0$ but $\partial L/\partial B \neq 0$: the first step
# moves $B$, and from then on $A$ learns too. With $A = B = 0$ both gradients are zero and stay zero:
# the adapter never leaves the saddle point. Three short SGD runs on a regression target:

# %%
Y = rng.standard_normal((3, 5)).astype(np.float32)


def train(layer, steps=4, lr=0.1):
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    opt = SGD([A, B], lr=lr)
    rows = []
    for _ in range(steps):
        loss = ((layer(Tensor(X)) - Y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        rows.append((loss.item(), float(np.abs(A.grad).max()), float(np.abs(B.grad).max())))
        opt.step()
    return rows


minilora.manual_seed(1)
runs = {"A random, B = 0 (PEFT)": lora_layer(6, 5, r=2, lora_alpha=4)}
minilora.manual_seed(1)
both_zero = lora_layer(6, 5, r=2, lora_alpha=4)
both_zero.lora_A["default"].weight.data[...] = 0
runs["A = 0, B = 0"] = both_zero
for name, layer_ in runs.items():
    print(name)
    for step, (loss, ga, gb) in enumerate(train(layer_)):
        print(f"  step {step}: loss {loss:.4f}   max|dL/dA| {ga:.2e}   max|dL/dB| {gb:.2e}")

# %% [markdown]
# With PEFT's initialisation, $\partial L/\partial A$ is exactly zero at step 0 and nonzero from step 1
# on, once $B$ has moved. With both factors at zero the loss never changes.
#
# ## 3. Dropout
#
# `lora_dropout` zeroes entries of the adapter's **input** during training (and scales the survivors by
# $1/(1-p)$, "inverted" dropout, so the expected input is unchanged):
# $h = W_0 x + s\,B A\,\text{dropout}(x)$. The frozen path sees $x$ untouched. In `eval()` mode
# there is no dropout at all.

# %%
minilora.manual_seed(2)
layer = lora_layer(6, 5, r=2, lora_alpha=4, init_lora_weights=False, lora_dropout=0.5)
x1 = Tensor(X[:1])                                    # one input, (1, in)
layer.eval()
h_eval = layer(x1).numpy()[0]
layer.train()
draws = np.stack([layer(x1).numpy()[0] for _ in range(4000)])
print("eval:                     ", h_eval)
print("train, 3 draws:           ", draws[0], draws[1], draws[2], sep="\n                           ")
print("train, mean of 4000 draws:", draws.mean(axis=0))

# With B = 0 the adapter path is zero, so any randomness would have to come from the frozen path:
layer.lora_B["default"].weight.data[...] = 0
print("B = 0, train mode: every draw equals W0·x exactly:",
      all(np.array_equal(layer(x1).numpy(), layer.base_layer(x1).numpy()) for _ in range(100)))

# %% [markdown]
# The training-mode outputs scatter around the eval output, and their mean converges to it (inverted
# dropout keeps the expectation). With $B = 0$ (as at initialisation) training-mode outputs are exactly
# $W_0 x$: the frozen path never sees the dropped input.
#
# ## 4. The gradients of $A$ and $B$
#
# Write the layer for a batch as $U = X A^\top$ (N, r), $H = X W_0^\top + s\,U B^\top$ (N, out), and let
# $G = \partial L / \partial H$ (N, out) be the gradient arriving from above. One product at a time:
#
# - $H$ depends on $B$ through $s\,U B^\top$: $\;\dfrac{\partial L}{\partial B} = s\,G^\top U$ : (out, N)·(N, r) = (out, r);
# - $H$ depends on $U$ the same way: $\;\dfrac{\partial L}{\partial U} = s\,G B$ : (N, out)·(out, r) = (N, r);
# - $U = X A^\top$: $\;\dfrac{\partial L}{\partial A} = \left(\dfrac{\partial L}{\partial U}\right)^{\!\top} X = s\,B^\top G^\top X$ : (r, N)·(N, in) = (r, in);
# - and for the input (what flows on to the layers below): $\;\dfrac{\partial L}{\partial X} = G W_0 + s\,G B A$;
# - $\dfrac{\partial L}{\partial W_0} = G^\top X$ would be an (out, in) matrix, as large as $W_0$: it is
#   **never computed**, because $W_0$ does not require grad.
#
# To check them, take $L = \sum H \odot G$ for a fixed random $G$; then $\partial L / \partial H = G$
# exactly. The layer runs as one fused autograd op (`lora_linear`, in `minilora/lora/fused.py`); inside
# `minilora.settings.reference()` it runs the module-by-module form (`base_layer(x) + lora_B(lora_A(x)) * s`)
# through generic autograd.

# %%
minilora.manual_seed(3)
layer = lora_layer(6, 5, r=2, lora_alpha=4, init_lora_weights=False)
W0 = layer.base_layer.weight.data
A_p, B_p = layer.lora_A["default"].weight, layer.lora_B["default"].weight
s = layer.scaling["default"]
G = rng.standard_normal((3, 5)).astype(np.float32)       # dL/dH, (N, out)

U = X @ A_p.data.T                                       # (N, r)
formula = {"A": s * B_p.data.T @ G.T @ X,                # (r, out)(out, N)(N, in) -> (r, in)
           "B": s * G.T @ U,                             # (out, N)(N, r) -> (out, r)
           "X": G @ W0 + s * G @ B_p.data @ A_p.data}    # (N, in)

for fused in (True, False):
    layer.zero_grad()
    x_t = Tensor(X, requires_grad=True)
    with minilora.settings.reference(not fused):     # not fused: the module form
        (layer(x_t) * G).sum().backward()
    got = {"A": A_p.grad, "B": B_p.grad, "X": x_t.grad}
    print(f"fused={fused!s:5}", "  ".join(f"dL/d{k} matches: {np.allclose(got[k], formula[k], atol=1e-5)}"
                                        for k in formula),
          f"  W0.grad is {layer.base_layer.weight.grad}")

# %% [markdown]
# `gradcheck` compares with central differences in float64 (section 4 of notebook 01). Here it checks
# the fused op with respect to $x$, $A$, $B$ **and** $W_0$: the $W_0$ formula is right even though a
# frozen layer never runs it.

# %%
x64, W64 = rng.standard_normal((4, 6)), rng.standard_normal((5, 6))
A64, B64 = rng.standard_normal((2, 6)), rng.standard_normal((5, 2))
ok = gradcheck(lambda x, W, A, B: lora_linear(x, W, None, A, B, scaling=2.0),  # s = α/r = 4/2
               [x64, W64, A64, B64], names=["x", "W0", "lora_A", "lora_B"])
print("gradcheck of lora_linear w.r.t. x, W0, A, B:", ok)

# %% [markdown]
# ### What the frozen weight costs in backward: nothing
#
# > During backprop, gradients flow through the network as usual. [...] Everything else — the frozen
# > base model weights — gets zero gradients.
#
# Slightly stronger in minilora (and PyTorch): the frozen weight gets **no** gradient, not a zero one.
# `W0.grad` stays `None`, the (out, in) product $G^\top X$ is skipped, and the optimizer holds no state
# for it.

# %%
layer = lora_layer(64, 64, r=4, lora_alpha=8)
trainable = {n: p.shape for n, p in layer.named_parameters() if p.requires_grad}
frozen = {n: p.shape for n, p in layer.named_parameters() if not p.requires_grad}
print("trainable:", trainable)
print("frozen:   ", frozen)
(layer(Tensor(rng.standard_normal((8, 64)).astype(np.float32))) ** 2).sum().backward()
print("after backward: base_layer.weight.grad is", layer.base_layer.weight.grad)
print("                lora_A grad max", float(np.abs(layer.lora_A["default"].weight.grad).max()),
      "(zero: B = 0 at init)  lora_B grad max", round(float(np.abs(layer.lora_B["default"].weight.grad).max()), 3))

# %% [markdown]
# ## 5. Scaling: $\alpha/r$ or $\alpha/\sqrt{r}$?
#
# > The effective learning rate for LoRA updates is α / r. So if you double r, you typically double α
# > to keep the same effective scale.
#
# Follow one SGD step of size $\eta$ from PEFT's initialisation, on one input $x$ with
# $L = \tfrac12\lVert h - y\rVert^2$, so $g = \partial L/\partial h = h - y$. Since $B = 0$ only $B$
# moves (section 2): $B_1 = -\eta\, s\, g\,(A x)^\top$. The update it makes to the output is
#
# $$\Delta W x = s\,B_1 A x = -\eta\, s^2\, \lVert A x\rVert^2\, g .$$
#
# $\lVert Ax\rVert^2$ is a sum of $r$ independent squares, so it grows like $r$: the update's size goes
# like $s^2 r$.
#
# - $s = \alpha/r$ (fixed $\alpha$): $s^2 r = \alpha^2/r$, **shrinks** as $1/r$: a larger rank learns
#   more slowly, so its extra capacity goes unused.
# - $s = \alpha/\sqrt{r}$ (rsLoRA, Kalajdzievski 2023, `use_rslora=True`): $s^2 r = \alpha^2$,
#   **independent of $r$**.
# - $\alpha = 2r$ with $\alpha/r$ (the article's "double α when you double r"): $s = 2$ and the update
#   **grows** like $r$; keeping $\alpha/r$ fixed keeps the factor fixed, not the size of the update.
#
# Measured on a 256×256 layer, averaged over seeds (left); then 100 SGD steps on a 64×64 layer fitting
# a regression whose target is a rank-8 change of $W_0$ (right):

# %%
ranks = [1, 2, 4, 8, 16, 32, 64]
schemes = {"α/r, α = 8": lambda r: dict(lora_alpha=8),
           "α/√r (rsLoRA), α = 8": lambda r: dict(lora_alpha=8, use_rslora=True),
           "α/r, α = 2r": lambda r: dict(lora_alpha=2 * r)}
n_seeds = 4 if FAST else 16


def first_update(r, seed, d=256, lr=1e-3, **kw):
    # ||ΔW x|| / ||W0 x|| after one SGD step from B = 0, on one input x
    minilora.manual_seed(seed)
    g = np.random.default_rng(seed)
    layer = lora_layer(d, d, r=r, **kw)
    x = g.standard_normal((1, d)).astype(np.float32)
    y = g.standard_normal((1, d)).astype(np.float32)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    loss = ((layer(Tensor(x)) - y) ** 2).sum() * 0.5
    loss.backward()
    SGD([A, B], lr=lr).step()
    dWx = x @ layer.get_delta_weight("default").T                      # (1, out)
    return float(np.linalg.norm(dWx) / np.linalg.norm(x @ layer.base_layer.weight.data.T))


sizes = {name: [np.mean([first_update(r, seed, **kw(r)) for seed in range(n_seeds)]) for r in ranks]
         for name, kw in schemes.items()}
print(f"{'r':>4}" + "".join(f"{name:>24}" for name in sizes))
for i, r in enumerate(ranks):
    print(f"{r:>4}" + "".join(f"{sizes[name][i]:>24.4g}" for name in sizes))

# %%
steps = 30 if FAST else 100


def relative_loss(r, steps, d=64, n=256, lr=0.3, seed=0, **kw):
    # loss after `steps` SGD steps / loss at the start, fitting W0 + (a rank-8 change)
    minilora.manual_seed(seed)
    g = np.random.default_rng(seed)
    layer = lora_layer(d, d, r=r, **kw)
    X = g.standard_normal((n, d)).astype(np.float32)
    change = (g.standard_normal((d, 8)) @ g.standard_normal((8, d)) / d).astype(np.float32)
    Y = X @ (layer.base_layer.weight.data + change).T
    opt = SGD([layer.lora_A["default"].weight, layer.lora_B["default"].weight], lr=lr)
    for step in range(steps):
        loss = ((layer(Tensor(X)) - Y) ** 2).mean()
        first = loss.item() if step == 0 else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item() / first


learning = {name: [relative_loss(r, steps, **schemes[name](r)) for r in ranks]
            for name in list(schemes)[:2]}
for name, vals in learning.items():
    print(f"{name:<22}", "  ".join(f"r={r}: {v:.3f}" for r, v in zip(ranks, vals)))

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
colors = {"α/r, α = 8": "tab:blue", "α/√r (rsLoRA), α = 8": "tab:orange", "α/r, α = 2r": "tab:green"}
for name, vals in sizes.items():
    left.plot(ranks, vals, "o-", color=colors[name], label=name)
r_arr = np.array(ranks, dtype=float)
for name, slope, label in (("α/r, α = 8", -1, "∝ 1/r"), ("α/√r (rsLoRA), α = 8", 0, "∝ 1"),
                           ("α/r, α = 2r", 1, "∝ r")):
    ref = sizes[name][0] * r_arr ** slope          # the s²·r prediction, anchored at r = 1
    left.plot(r_arr, ref, color="grey", lw=0.8, ls=":")
    left.text(r_arr[-1] * 1.12, ref[-1], label, color="grey", va="center", fontsize=8)
left.set_xlim(0.8, 110)
left.set_xscale("log", base=2)
left.set_yscale("log")
left.set_xlabel("rank r")
left.set_ylabel("||ΔW x|| / ||W0 x|| after one SGD step")
left.set_title("the first update's size (dotted: the s²·r prediction)")
left.legend(fontsize=8)
for name, vals in learning.items():
    right.plot(ranks, vals, "o-", color=colors[name], label=name)
right.axvline(8, color="grey", lw=0.8, ls=":")
right.text(8.4, 0.95, "rank of the target change", color="grey", fontsize=8, va="top")
right.set_xscale("log", base=2)
right.set_xlabel("rank r")
right.set_ylabel(f"loss after {steps} SGD steps / initial loss")
right.set_title("how much each rank learns (lower is better)")
right.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# With $\alpha/r$ the first update shrinks like $1/r$ and a rank-64 adapter learns **less** than a
# rank-2 one in the same number of steps, although it could represent strictly more. With rsLoRA's
# $\alpha/\sqrt{r}$ the update size does not depend on $r$, and learning improves with rank until the
# rank of the target (8) and then levels off. Doubling $\alpha$ with $r$ keeps $s$ fixed but makes the
# update grow like $r$, so at a fixed learning rate a high rank can overshoot.
#
# ## What to take away
#
# - $h = W_0x + \frac{\alpha}{r}B(Ax)$: two thin matrix products beside the frozen one; merged, it is
#   one matrix $W_0 + \Delta W$ with the same output.
# - $B = 0$ at the start makes the adapted model **equal** the base model; $A$ random lets the first
#   gradient step move $B$. Both zero would never train.
# - Each factor's gradient goes through the other: $\partial L/\partial B = s\,G^\top X A^\top$,
#   $\partial L/\partial A = s\,B^\top G^\top X$. The frozen $W_0$ gets no gradient and no optimizer state.
# - Dropout touches the adapter's input only, and only in training mode.
# - $\alpha/r$ makes high ranks learn slowly; rsLoRA's $\alpha/\sqrt{r}$ keeps the update's size
#   independent of $r$.
