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
# # 00 · Checking the article
#
# The article *What is LoRA?* teaches LoRA with one formula, a worked 4×4 example and a handful of
# memory figures. minilora can recompute every one of them, so this notebook does:
#
# - runs the article's **worked example** through `minilora.lora.merge.merge_trace`, which prints every
#   intermediate with its shape;
# - shows **where the article's numbers diverge** from it, and why (a shape convention, and arithmetic);
# - **redoes the example correctly**, by the trace and by a real `LoraLinear`;
# - prints the **table of every claim** that `minilora check-article` checks;
# - draws the **memory of fine-tuning Llama 3 70B** (full, LoRA, QLoRA) with the article's figures marked.
#
# Conventions (PEFT's and the LoRA paper's): a weight is (out, in); `lora_A` is (r, in); `lora_B` is
# (out, r); so $\Delta W = B A \cdot \alpha / r$ is (out, in), the shape of $W_0$.

# %%
import matplotlib.pyplot as plt
import numpy as np

import minilora
from minilora import Tensor, memory, nn
from minilora.teaching import article
from minilora.lora import LoraLinear, merge

minilora.manual_seed(0)
np.set_printoptions(precision=4, suppress=True)

W0 = np.asarray(article.EX_W0)    # the article's numbers, copied once into minilora.teaching.article
x = np.asarray(article.EX_X)
A_printed = np.asarray(article.EX_A)  # "shape (4 × 2)"
B_printed = np.asarray(article.EX_B)  # "shape (2 × 4)"
alpha, r = article.EX_ALPHA, article.EX_R
print("W0", W0.shape, " x", x.shape, " A as printed", A_printed.shape, " B as printed", B_printed.shape,
      f" alpha={alpha}, r={r}")

# %% [markdown]
# ## 1. The example as the article writes it
#
# > ```
# > # Forward: h = W₀ · x
# > h_base = [3.61, 2.37, 3.56, 2.36]
# > ...
# > A = [[0.5, 0.2], ...]           # shape (4 × 2)
# > B = [[0.3, 0.0, 0.5, 0.2], ...] # shape (2 × 4)
# > BA = B @ A  # → shape (4 × 4)
# > scaling = α / r = 8 / 2 = 4.0
# > h = W₀·x + (BA·x) * scaling
# >   = [3.61, 2.37, 3.56, 2.36] + [1.42, 1.08, 1.24, 1.56] * 4
# >   = [3.61, 2.37, 3.56, 2.36] + [5.68, 4.32, 4.96, 6.24]
# >   = [9.29, 6.69, 8.52, 8.60]
# > ```
#
# Four things to check, in order: $W_0 x$, the shape of $BA$, $BA\,x$, and the final $h$.
#
# ### 1a. $W_0 x$
#
# The first row of $W_0$ times $x$ is $2.0\cdot1.0 + 0.5\cdot0.5 + 1.2\cdot0.8 + 0.8\cdot0.2 = 3.37$, not
# $3.61$. The trace's `W0x` step (the frozen layer's output) gives all four; multiplying by the
# *columns* instead ($x^\top W_0$, the other convention) does not give the article's numbers either.

# %%
no_adapter = merge.merge_trace(W0, np.zeros((r, 4)), np.zeros((4, r)), alpha, r, x=x)
columns = merge.merge_trace(W0.T, np.zeros((r, 4)), np.zeros((4, r)), alpha, r, x=x)
print("article  h_base =", np.asarray(article.EX_H_BASE))
print("W0 · x          =", no_adapter["W0x"].value)
print("x^T · W0        =", columns["W0x"].value)

# %% [markdown]
# ### 1b. The shape of $BA$
#
# The article's `B` is (2×4) and its `A` is (4×2). Run literally, `B @ A` is (2×4)·(4×2) = **(2×2)**,
# which cannot be added to a 4×4 $W_0$. minilora's shape check says what went wrong:

# %%
print("the article's own line, B @ A:", (B_printed @ A_printed).shape)
try:
    merge.merge_trace(W0, A_printed, B_printed, alpha, r, x=x)   # lora_A = A, lora_B = B, as printed
except ValueError as err:
    print("merge_trace refuses:", err)

# %% [markdown]
# The article mixes two conventions. The LoRA paper writes $B \in \mathbb{R}^{d\times r}$ and
# $A \in \mathbb{R}^{r\times k}$; the article's *Rank Decomposition* section says "A is (d × r) and B is
# (r × k)", the names swapped. Its example follows the swapped names: its `A` (4×2) has the shape of the
# paper's $B$ (out, r), and its `B` (2×4) the shape of the paper's $A$ (r, in). So the only product that
# is 4×4 is `A @ B`. Two readings make the example well-defined:
#
# | reading | `lora_A` (r, in) | `lora_B` (out, r) | $\Delta W$ |
# |---|---|---|---|
# | swap the names (what the shapes say) | the article's `B` (2×4) | the article's `A` (4×2) | article `A @ B` |
# | keep the names, transpose | $A^\top$ (2×4) | $B^\top$ (4×2) | $B^\top A^\top = (AB)^\top$ |
#
# ### 1c. $BA\,x$ under each reading
#
# Neither reading gives the article's `[1.42, 1.08, 1.24, 1.56]`.

# %%
readings = {
    "swap the names": merge.merge_trace(W0, B_printed, A_printed, alpha, r, x=x),
    "transpose":      merge.merge_trace(W0, A_printed.T, B_printed.T, alpha, r, x=x),
}
print(f"{'':16}{'B·(A·x)':>34}{'h':>34}")
print(f"{'article':16}{str(np.asarray(article.EX_BAX)):>34}{str(np.asarray(article.EX_H)):>34}")
for name, t in readings.items():
    print(f"{name:16}{str(np.round(t['BAx'].value, 4)):>34}{str(np.round(t['h_unmerged'].value, 4)):>34}")

# %% [markdown]
# ### 1d. The last two lines
#
# From its own intermediate values the article's arithmetic is right: $h_{base} + 4 \cdot BAx$ does give
# `[9.29, 6.69, 8.52, 8.60]`. The error is upstream: both inputs to that sum are wrong. The article check
# records this as claim `ex-additions` (holds) next to `ex-h-base`, `ex-bax` and `ex-h` (wrong):

# %%
claims = {c.id: c for c in article.check_article()}
for cid in ("ex-h-base", "ex-ba-shape", "ex-bax", "ex-h", "ex-additions", "ex-b-zero", "ex-67m"):
    c = claims[cid]
    print(f"[{c.verdict}] {cid}: {c.explanation}\n")

# %% [markdown]
# Two smaller slips in the same section:
#
# - "We randomly initialize A from a Gaussian and **set B to zero** (so at the start, LoRA contributes
#   nothing)" is right (section 3 shows it), but the example then uses a nonzero `B`: it shows an adapter
#   *after* some training.
# - "without touching the original **67M+** parameters": this $W_0$ has 16; 67M is the 8192×8192 layer
#   of an earlier section.
#
# ## 2. The example, redone
#
# Reading the shapes as PEFT stores them (`lora_A` = the article's `B`, `lora_B` = the article's `A`),
# here is the whole trace: every intermediate, its shape, and what it is. The last line compares the
# **merged** weight's output with the **unmerged** layer's: merging changes nothing but rounding.

# %%
lora_A, lora_B = B_printed, A_printed      # (r, in) = (2, 4) and (out, r) = (4, 2)
trace = merge.merge_trace(W0, lora_A, lora_B, alpha, r, x=x)
print(trace)

# %% [markdown]
# The same numbers from the layer minilora trains: a `LoraLinear` wrapped around a 4×4 `Linear`
# holding $W_0$. Right after `update_layer`, $B = 0$ (PEFT's initialisation), so the adapter adds
# **exactly nothing**: the output is $W_0 x$ bit for bit. Loading the example's factors into it gives the
# trace's $h$.

# %%
base = nn.Linear(4, 4)
base.weight.data = W0.copy()
layer = LoraLinear(base, module_name="example")
layer.update_layer("default", r=r, lora_alpha=alpha)          # A random, B = 0
layer.set_adapter("default")
xt = Tensor(x[None, :])                                       # a batch of one row: (1, in)

h_init = layer(xt).numpy()[0]
print("at init: B is all zero:", not layer.lora_B["default"].weight.data.any())
print("         h == W0·x exactly:", np.array_equal(h_init, trace["W0x"].value), h_init)

layer.lora_A["default"].weight.data = lora_A.copy()           # (2, 4)
layer.lora_B["default"].weight.data = lora_B.copy()           # (4, 2)
h_trained = layer(xt).numpy()[0]
print("trained: h =", h_trained, " matches the trace:", np.allclose(h_trained, trace["h_unmerged"].value))
print("ΔW from the layer equals the trace's:",
      np.allclose(layer.get_delta_weight("default"), trace["delta_W"].value))

# %% [markdown]
# The article's merge diagram also says the merge is "adding the trained BA matrix to the frozen base
# weights, **then scaling by α/r**". Order matters: scaling after the sum also multiplies $W_0$.
# The formula the article gives elsewhere, $W_0 + BA\cdot\alpha/r$, is the right one (claim `merge-order`):

# %%
c = claims["merge-order"]
print(f"[{c.verdict}] {c.explanation}")

# %%
labels = ["h_base = W0·x", "adapter: B·A·x·α/r", "h"]
article_vals = [article.EX_H_BASE, article.EX_SCALED, article.EX_H]
correct_vals = [trace["W0x"].value, trace["scaled"].value, trace["h_unmerged"].value]

fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
rows = np.arange(4)
for ax, label, a_vals, c_vals in zip(axes, labels, article_vals, correct_vals):
    ax.bar(rows - 0.2, a_vals, width=0.4, color="tab:red", alpha=0.7, label="the article")
    ax.bar(rows + 0.2, c_vals, width=0.4, color="tab:blue", label="minilora (merge_trace)")
    ax.set_xticks(rows, [f"row {i}" for i in rows])
    ax.set_title(label)
axes[0].legend(loc="upper right", fontsize=8)
fig.suptitle("The worked example: the article's numbers vs the recomputed ones")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Every claim in the article
#
# `minilora check-article` turns each number or shape in the article into a claim, evaluates it under
# the plausible readings (which model, which layers, whether the NF4 constants count) and gives a
# verdict: **holds**, **depends on an assumption**, **wrong**, or **inconsistent** (the setting the
# article names disagrees, another setting agrees). This is the command's table; the full report with
# every reading is `docs/article-check.md`.

# %%
all_claims = list(claims.values())
print(article.format_table(all_claims))
counts = {v: sum(c.verdict == v for c in all_claims) for v in article.VERDICTS}
print("\n" + ", ".join(f"{n} {v}" for v, n in counts.items()) + f" ({len(all_claims)} claims)")
print("drift from what minilora.teaching.article expects:", article.run_checks(all_claims) or "none")

# %% [markdown]
# The claims that do not hold, with the reason minilora gives:

# %%
for c in all_claims:
    if c.verdict != "holds" and not c.id.startswith("ex-"):
        print(f"[{c.verdict}] {c.id}: {c.explanation}\n")

# %% [markdown]
# ## 4. Memory for Llama 3 70B
#
# The article's figures:
#
# > Full fine-tuning a 70B parameter model [...] you'd need ~14 A100s just to fit the model and gradients.
# >
# > Standard LoRA: Base Model (16-bit) 70B × 2 bytes ≈ 140 GB [...] Needs ~4× A100 80GB GPUs [...] Total ~145 GB
# >
# > QLoRA: Base Model (4-bit NF4) 70B × 0.5 bytes (NF4) ≈ 35 GB [...] Runs on 1× A100 80GB! [...] Total ~40 GB
#
# `minilora.memory.memory_breakdown` counts weights, gradients, optimizer state (AdamW: 8 bytes, plus a
# 4-byte fp32 master copy of 16-bit trainable weights) and NF4 constants, for the real Llama 3 70B shapes
# (`PRESETS["llama3-70b"]`) with the article's `LoraConfig` (r = 16 on q, k, v, o). Activations are
# not counted. GB = $10^9$ bytes, as the article writes; an "80GB" card holds 80 GiB = 85.9 GB.

# %%
model, qkvo = article.LLAMA3_70B, article.QKVO
runs = {
    "full fine-tune": memory.memory_breakdown(model, "full"),
    "LoRA (16-bit base)": memory.memory_breakdown(model, "lora", r=16, target_modules=qkvo),
    "QLoRA (NF4 base)": memory.memory_breakdown(model, "qlora", r=16, target_modules=qkvo),
}
for name, mb in runs.items():
    print(f"{name}: {mb.gb():.1f} GB = {mb.gib():.1f} GiB -> "
          f"{memory.gpus_needed(mb.total, 80)} × A100 80GB, fits one 48GB card: {memory.fits_on(mb.total, 48)}")
print()
print(runs["QLoRA (NF4 base)"])

# %%
parts = [("weights", "base weights", "tab:gray"), ("adapter", "adapter weights", "tab:green"),
         ("gradients", "gradients", "tab:orange"), ("optimizer", "optimizer state + master", "tab:red"),
         ("quant_constants", "NF4 constants", "tab:purple")]
card_80 = 80 * memory.GiB / memory.GB          # an "80GB" A100 in decimal GB
# the article's figures, in GB: (bar, value, label)
marks = [(0, 14 * card_80, "~14 × A100 80GB"), (1, 140, "base ≈ 140 GB"), (1, 145, "total ~145 GB"),
         (2, 35, "base ≈ 35 GB"), (2, 40, "total ~40 GB")]

fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2]})
for ax, which in zip(axes, ([0, 1, 2], [1, 2])):
    zoomed = len(which) == 2
    names = [list(runs)[i] for i in which]
    bottom = np.zeros(len(names))
    for attr, label, color in parts:
        vals = np.array([runs[n].gb(attr) for n in names])
        ax.bar(range(len(names)), vals, bottom=bottom, color=color, label=label, width=0.55)
        bottom += vals
    for pos, (i, name) in enumerate(zip(which, names)):
        inside = bottom[pos] > 0.15 * bottom.max()     # a short bar gets its label on top
        ax.text(pos, bottom[pos] / 2 if inside else bottom[pos], f"{runs[name].gb():.1f} GB",
                ha="center", va="center" if inside else "bottom", color="white" if inside else "black",
                fontsize=9, fontweight="bold")
        for bar, value, label in marks:
            if bar == i and (zoomed or i == 0):   # the article's figures: where they can be read
                ax.plot([pos - 0.38, pos + 0.38], [value, value], "k--", lw=1.2)
                ax.text(pos + 0.4, value, label, va="center", fontsize=8)
    if zoomed:
        for gb, label, color in ((card_80, "one A100 80GB", "tab:blue"),
                                 (48 * memory.GiB / memory.GB, "one 48GB card", "tab:cyan")):
            ax.axhline(gb, color=color, lw=1, ls=":")
            ax.text(1.45, gb, label, color=color, va="bottom", ha="right", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.5, len(names) - 0.1 + (0.5 if zoomed else 0))
    ax.set_ylabel("GB (10^9 bytes), activations not included")
axes[0].set_title("Llama 3 70B: training memory (dashed: the article's figures)")
axes[1].set_title("LoRA and QLoRA, zoomed")
axes[1].set_ylim(0, 165)
axes[0].legend(loc="upper right", fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# Reading the chart:
#
# - **Full fine-tuning** needs 16 bytes per parameter with AdamW: about 1.13 TB, or 14 A100-80GB cards.
#   "~14 A100s" is right, but not "to fit the model and gradients": those are only 4 bytes per
#   parameter (4 cards); the rest is optimizer state and master weights.
# - **LoRA** trains 65.5M parameters (0.09%): its gradients and optimizer state are under 1 GB. The
#   16-bit base dominates, and ~145 GB fits on **2** A100-80GB cards, not 4 (claim `mem-lora-gpus`).
# - **QLoRA** shrinks the base 4×. "70B × 0.5 bytes ≈ 35 GB" leaves out the NF4 absmax constants and
#   the 16-bit embeddings and `lm_head`; the stored base is 39.5 GB, and the total ~40.6 GB matches the
#   article's ~40 GB. It fits one 48 GB card before activations, which is what makes the introduction's
#   "70B on a single 48GB GPU" true **for QLoRA only** (claim `mem-70b-48gb`).
#
# ## What to take away
#
# - The article's formula is right, but its worked example uses swapped names for $A$ and $B$ (so its
#   `B @ A` is 2×2) and wrong arithmetic for $W_0 x$ and $BAx$; redone, $h$ = `[5.33, 4.156, 4.908, 4.026]`.
# - Merging is exact up to rounding: $(W_0 + \Delta W)x$ equals $W_0 x + \Delta W x$ (notebook 06 looks
#   at the rounding).
# - Memory figures need their assumptions stated: which modules, which bytes per parameter, GB or GiB,
#   and whether the quantization constants count. `minilora.memory` makes each one a parameter.
