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
# # 06 · Merging adapters
#
# > Merge the trained A and B matrices back into W₀ to get a standalone model with no adapter overhead:
# > W_merged = W₀ + (B · A · α / r). [...] Once merged, you can discard A and B and use the model like
# > any fine-tuned model. — *What is LoRA?*
#
# Merging is one addition per adapted weight; unmerging is one subtraction. In exact arithmetic both are
# free and exact. In floating point they round, and this notebook measures how much:
#
# - **merge and unmerge step by step** on one layer, with `minilora.lora.merge`;
# - **merged vs unmerged outputs** in float32 and float16: small adapters partly vanish in float16;
# - **drift** over repeated merge/unmerge cycles: bounded for a fixed adapter, a random walk when it changes;
# - a small Llama: merged logits, `merge_and_unload`, **swapping adapters** and saving/loading them;
# - **adapter arithmetic** (`add_weighted_adapter`: linear, cat, svd), and why only cat is exact.

# %%
import copy
import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest (set before NumPy loads)

import matplotlib.pyplot as plt
import numpy as np

import minilora
from minilora import Tensor, nn
from minilora.lora import LoraConfig, LoraLinear, PeftModel, get_peft_model, merge
from minilora.lora.io import adapter_size_bytes
from minilora.models import LlamaConfig, LlamaForCausalLM

FAST = os.environ.get("MINILORA_FAST") == "1"   # fewer merge/unmerge cycles for quick CI runs
minilora.manual_seed(0)
rng = np.random.default_rng(0)
np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. Merge and unmerge, step by step
#
# A 4×6 layer with a rank-2 adapter, $\alpha = 4$. `merge_trace` prints every intermediate: $BA$, the
# scaling, $\Delta W$, the merged $W = W_0 + \Delta W$, and, given an input, the layer's output both ways.

# %%
W0 = rng.uniform(-0.4, 0.4, (4, 6))        # (out, in), float64 here
A = rng.uniform(-0.4, 0.4, (2, 6))         # (r, in)
B = rng.normal(0, 0.3, (4, 2))             # (out, r): nonzero, as after training
x = rng.standard_normal(6)
print(merge.merge_trace(W0, A, B, lora_alpha=4, r=2, x=x))

# %% [markdown]
# Unmerging subtracts the same $\Delta W$ (`merge.delta_weight`, the one function both call). The
# round trip returns $W_0$ up to one rounding per entry; some entries come back bit for bit, some one
# unit in the last place (ulp) off:

# %%
for dtype in (np.float64, np.float32, np.float16):
    W = W0.astype(dtype)
    back = merge.unmerge_weight(merge.merge_weight(W, A, B, 4, 2), A, B, 4, 2)
    err = np.abs(back.astype(np.float64) - W.astype(np.float64))
    print(f"{np.dtype(dtype).name:8}: max |unmerge(merge(W0)) - W0| = {err.max():.2e}, "
          f"entries exactly back: {np.mean(err == 0):.0%}, ulp of 0.25 = {float(np.spacing(dtype(0.25))):.1e}")

# %% [markdown]
# In a model the same happens inside `LoraLinear`: `merge()` folds $\Delta W$ into the base weight and
# the forward pass then runs the base layer alone; `unmerge()` takes it out again.

# %%
layer = LoraLinear(nn.Linear(6, 4), module_name="demo")
layer.update_layer("default", r=2, lora_alpha=4, init_lora_weights=False)
layer.set_adapter("default")
W_start = layer.weight.data.copy()
xt = Tensor(rng.standard_normal((3, 6)).astype(np.float32))
h_unmerged = layer(xt).numpy()
layer.merge()
print("merged:", layer.merged, layer.merged_adapters, " W changed by max",
      float(np.abs(layer.weight.data - W_start).max()))
print("max |h merged - h unmerged| =", float(np.abs(layer(xt).numpy() - h_unmerged).max()))
layer.unmerge()
print("unmerged:", layer.merged, " max |W - W0| =", float(np.abs(layer.weight.data - W_start).max()))

# %% [markdown]
# ## 2. Merged vs unmerged outputs: float32 and float16
#
# Unmerged, the layer adds the adapter's contribution $s\,B(Ax)$ to $W_0x$ in float32. Merged, $\Delta W$
# is first added to $W_0$ **and rounded to $W_0$'s dtype**. `merge_weight` does the addition in float32
# and rounds once (as PEFT does), so the only error is that rounding: relative $2^{-24} \approx 6\cdot10^{-8}$
# in float32, $2^{-11} \approx 5\cdot10^{-4}$ in float16.
#
# That error is relative to $W_0$, not to $\Delta W$. A trained adapter is usually small next to $W_0$,
# so in float16 a good part of it can fall below half an ulp of $W_0$ and **vanish**: the merged entry is
# bit-identical to $W_0$'s. Below, a 256×256 layer with $W_0 \sim U(\pm 1/16)$ and adapters of
# decreasing size; the error is measured relative to the adapter's own contribution, which is what the
# merge is supposed to keep.

# %%
d, r, alpha = 256, 8, 16
W0 = rng.uniform(-1, 1, (d, d)) / np.sqrt(d)         # (out, in)
A = rng.uniform(-1, 1, (r, d)) / np.sqrt(d)          # (r, in)
x = rng.standard_normal(d)
B_unit = rng.standard_normal((d, r))                 # (out, r), scaled below
scales = np.logspace(-1, -5, 9)
rows = {}
for dtype in (np.float32, np.float16):
    rel_err, lost = [], []
    for b in scales:
        t = merge.merge_trace(W0.astype(dtype), A.astype(np.float32), (b * B_unit).astype(np.float32),
                              alpha, r, x=x.astype(np.float32))
        adapter_part = np.linalg.norm(t["scaled"].value)                 # ||s·B·A·x||
        rel_err.append(np.linalg.norm(t["h_merged"].value - t["h_unmerged"].value) / adapter_part)
        dW = t["delta_W"].value
        lost.append(np.mean((t["W_merged"].value == t["W0"].value) & (dW != 0)))  # ΔW swallowed by rounding
    rows[np.dtype(dtype).name] = (np.array(rel_err), np.array(lost))

ratio = [np.abs(merge.delta_weight(A, b * B_unit, alpha, r)).mean() / np.abs(W0).mean() for b in scales]
print(f"{'|ΔW|/|W0|':>10} | {'float32: error':>15} {'lost':>6} | {'float16: error':>15} {'lost':>6}")
for i, q in enumerate(ratio):
    print(f"{q:>10.1e} | {rows['float32'][0][i]:>15.1e} {rows['float32'][1][i]:>6.0%} | "
          f"{rows['float16'][0][i]:>15.1e} {rows['float16'][1][i]:>6.0%}")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
for name, color in (("float32", "tab:blue"), ("float16", "tab:red")):
    left.loglog(ratio, rows[name][0], "o-", color=color, label=name)
    right.semilogx(ratio, 100 * rows[name][1], "o-", color=color, label=name)
left.set_xlabel("adapter size: mean |ΔW| / mean |W0|")
left.set_ylabel("||h merged − h unmerged|| / ||s·B·A·x||")
left.set_title("merging error, relative to what the adapter adds")
right.set_xlabel("adapter size: mean |ΔW| / mean |W0|")
right.set_ylabel("% of ΔW entries lost in the merge")
right.set_title("entries where the merged weight == W0")
for ax in (left, right):
    ax.invert_xaxis()
    ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Both errors are rounding relative to $W_0$ (about $10^{-7}$ of it in float32, $10^{-3}$ in float16),
# so relative to the adapter they grow as the adapter shrinks. In float32 that stays below 1% over the
# whole range shown. In float16 it is already ~1% of the adapter's contribution when $\Delta W$ is 2% of
# $W_0$, ~5% at 0.5%, and when $\Delta W$ is $10^{-4}$ of $W_0$ most of its entries round away entirely.
# Merging into a 16-bit model is fine for a strong adapter, but it is not free; keep the adapter unmerged
# (or merge into float32 weights) when its update is tiny.
#
# ## 3. Drift over repeated merge/unmerge cycles
#
# Some workflows merge and unmerge many times: generating with merged weights between training steps,
# or switching adapters in a server. Does the error accumulate? Two cases on the 256×256 layer
# (float32 and float16 $W_0$, adapter at 1% of $W_0$):
#
# - **the same adapter** every cycle: $W \to \text{unmerge}(\text{merge}(W))$;
# - **an adapter that changes** a little between cycles (as it does during training).

# %%
n_cycles = 200 if FAST else 1000
B_small = 1e-2 * B_unit
drift = {}
for dtype in (np.float32, np.float16):
    for changing in (False, True):
        g = np.random.default_rng(1)
        W_start = W0.astype(dtype)
        W, Bc, Af = W_start.copy(), B_small.astype(np.float32), A.astype(np.float32)
        errs = []
        for k in range(n_cycles):
            if changing:                                   # an optimizer step moves B a little
                Bc = Bc + (1e-4 * g.standard_normal(Bc.shape)).astype(np.float32)
            W = merge.unmerge_weight(merge.merge_weight(W, Af, Bc, alpha, r), Af, Bc, alpha, r)
            errs.append(np.abs(W.astype(np.float64) - W_start.astype(np.float64)).mean())
        drift[(np.dtype(dtype).name, changing)] = np.array(errs)
for (name, changing), errs in drift.items():
    label = "changing adapter" if changing else "same adapter    "
    print(f"{name} {label}: mean |W - W0| after 1, 10, 100, {n_cycles} cycles:",
          "  ".join(f"{errs[k - 1]:.2e}" for k in (1, 10, 100, n_cycles)))

# %%
fig, ax = plt.subplots(figsize=(7.5, 4.2))
cycles = np.arange(1, n_cycles + 1)
styles = {("float32", False): ("tab:blue", "--"), ("float32", True): ("tab:blue", "-"),
          ("float16", False): ("tab:red", "--"), ("float16", True): ("tab:red", "-")}
for key, errs in drift.items():
    color, ls = styles[key]
    ax.loglog(cycles, errs, ls, color=color,
              label=f"{key[0]}, {'adapter changes each cycle' if key[1] else 'same adapter'}")
for name, color in (("float32", "tab:blue"), ("float16", "tab:red")):
    first = drift[(name, True)][0]
    ax.loglog(cycles, first * np.sqrt(cycles), ":", color=color, lw=0.8)
ax.text(cycles[-1], drift[("float16", True)][0] * np.sqrt(cycles[-1]), " ∝ √cycles", fontsize=8,
        va="center", color="grey")
ax.set_xlabel("merge/unmerge cycles")
ax.set_ylabel("mean |W − W0|")
ax.set_title("drift of the base weight over merge/unmerge cycles")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# With the same adapter the error after one cycle is all there is: the second cycle rounds the same
# numbers the same way, so $W$ stops moving (flat dashed lines). When the adapter changes between cycles
# each round trip rounds differently, the errors are independent, and they add up like a random walk,
# $\propto \sqrt{\text{cycles}}$. If exactness matters, keep a copy of $W_0$ (or reload it) rather than
# unmerge.
#
# ## 4. A small Llama: merged vs unmerged logits
#
# A randomly initialised Llama (hidden size 64, 2 layers, the byte vocabulary), with two adapters on
# q, k, v, o. `init_lora_weights=False` draws $B$ at random, standing in for trained adapters (with
# PEFT's $B = 0$ there would be nothing to merge).

# %%
config = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)
minilora.manual_seed(0)
base = LlamaForCausalLM(config)
base_weights = {k: v.copy() for k, v in base.state_dict().items()}   # W0, kept for later
ids = rng.integers(0, 256, size=(2, 16))                               # (batch, seq) byte ids
base_logits = base(ids).numpy()

lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         init_lora_weights=False)
model = get_peft_model(base, lora_config, adapter_name="math-expert")
model.add_adapter("code-assistant", lora_config)
model.print_trainable_parameters()

logits = model(ids).numpy()
model.merge_adapter()
merged_logits = model(ids).numpy()
print("adapter changes the logits by max", float(np.abs(logits - base_logits).max()))
print("merged vs unmerged logits: max diff", float(np.abs(merged_logits - logits).max()))
model.unmerge_adapter()

standalone = copy.deepcopy(model).merge_and_unload()          # plain Linear layers, no LoRA left
print("after merge_and_unload, q_proj is a", type(standalone.model.layers[0].self_attn.q_proj).__name__,
      "; logits max diff", float(np.abs(standalone(ids).numpy() - logits).max()))


# %% [markdown]
# The merged logits differ from the unmerged ones only by float32 rounding. Twenty merge/unmerge
# cycles of the whole model with the same adapter, as in section 3, leave the weights one rounding away
# from $W_0$, not twenty:

# %%
def weight_drift(model):
    # max |W - W0| over every base weight; a wrapped layer's W lives at "<name>.base_layer.weight"
    current = model.get_base_model().state_dict()
    wrapped = lambda k: k.removesuffix(".weight") + ".base_layer.weight"  # noqa: E731
    return max(float(np.abs(current.get(wrapped(k), current.get(k)) - w0).max())
               for k, w0 in base_weights.items())


for cycle in range(1, 21):
    model.merge_adapter()
    model.unmerge_adapter()
    if cycle in (1, 2, 5, 20):
        print(f"after {cycle:2} cycles: max |W - W0| = {weight_drift(model):.2e}")
with model.disable_adapter():
    print("disabled adapters vs the original base model: max logit diff",
          float(np.abs(model(ids).numpy() - base_logits).max()))

# %% [markdown]
# ## 5. Swapping adapters
#
# > Adapters are small (~100MB for r=16). You can have multiple adapters for different tasks and
# > load/swap them at runtime:
# > ```
# > model.load_adapter("./finetuned-math-adapter", "math-expert")
# > model.load_adapter("./finetuned-code-adapter", "code-assistant")
# > model.set_adapter("math-expert")
# > ```
#
# The same calls in minilora, with PEFT's file format. Saving writes each adapter to its own folder;
# a fresh copy of the base model loads them back, and `set_adapter` switches between them without
# touching $W_0$. (The loaded copy is not bit-identical to `model`: that one's $W_0$ went through the
# 20 merge/unmerge cycles above, one rounding away from the original; the fresh copy has the original.)

# %%
with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)                          # tmp/math-expert/, tmp/code-assistant/
    for name in sorted(os.listdir(tmp)):
        print(f"{name}: {sorted(os.listdir(os.path.join(tmp, name)))}, "
              f"{adapter_size_bytes(os.path.join(tmp, name)):,} bytes")
    print(f"the base model: {sum(v.nbytes for v in base_weights.values()):,} bytes of float32 weights")

    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(base_weights)                 # another copy of the same W0
    served = PeftModel.from_pretrained(fresh, os.path.join(tmp, "math-expert"), adapter_name="math-expert")
    served.load_adapter(os.path.join(tmp, "code-assistant"), "code-assistant")

outputs = {}
for name in ("math-expert", "code-assistant"):
    served.set_adapter(name)
    model.set_adapter(name)
    outputs[name] = served(ids).numpy()
    print(f"{name:15} loaded copy vs the original model: max logit diff "
          f"{np.abs(outputs[name] - model(ids).numpy()).max():.1e}")
print("the two adapters give different logits: max diff",
      float(np.abs(outputs["math-expert"] - outputs["code-assistant"]).max()))
with served.disable_adapter():
    print("disable_adapter() gives the base model back:", np.allclose(served(ids).numpy(), base_logits, atol=1e-6))

# %% [markdown]
# To serve a merged adapter and switch, unmerge first: a merged model runs the base layers alone, so
# the active adapter must be taken out of $W_0$ before another is put in
# (`unmerge_adapter` → `set_adapter` → `merge_adapter`). PEFT's `set_adapter` unmerges on its own (with
# a warning); here the three calls are explicit.

# %%
served.set_adapter("math-expert")
served.merge_adapter()
print("math-expert merged:   ", np.allclose(served(ids).numpy(), outputs["math-expert"], atol=1e-5))
served.unmerge_adapter()
served.set_adapter("code-assistant")
served.merge_adapter()
print("code-assistant merged:", np.allclose(served(ids).numpy(), outputs["code-assistant"], atol=1e-5))
served.unmerge_adapter()

# %% [markdown]
# ## 6. Adapter arithmetic: linear, cat, svd
#
# `add_weighted_adapter(adapters, weights, name, combination_type)` builds one adapter whose update is
# meant to be the weighted sum $\Delta W = \sum_i w_i\,\Delta W_i$ with $\Delta W_i = s_i B_i A_i$. The new
# adapter has $\alpha = r$ (scaling 1); the three ways differ in how they build its $A$ and $B$:
#
# - **cat**: stack the factors, $A = \begin{bmatrix} w_1 s_1 A_1 \\ w_2 s_2 A_2 \end{bmatrix}$ and
#   $B = [\,B_1 \;\; B_2\,]$. A block row times a block column is the sum of the block products, so
#   $BA = w_1 s_1 B_1A_1 + w_2 s_2 B_2A_2$: **exact**, at rank $r_1 + r_2$.
# - **linear**: mix the factors, $A = c_1A_1 + c_2A_2$, $B = c_1B_1 + c_2B_2$ with $c_i = \sqrt{w_i s_i}$.
#   Then $BA = c_1^2 B_1A_1 + c_2^2 B_2A_2 + c_1c_2\,(B_1A_2 + B_2A_1)$: the wanted sum **plus cross
#   terms** that pair one adapter's $B$ with the other's $A$. Exact only for a single adapter.
# - **svd**: form $\sum_i w_i\Delta W_i$, take its SVD and keep the top `svd_rank` singular triplets, the
#   best approximation of that rank (Eckart–Young). Exact when `svd_rank` $\geq$ the sum's rank
#   ($\leq r_1 + r_2$); otherwise the error is exactly the dropped singular values.
#
# Each combination of the two rank-4 adapters, weights 0.7 and 0.3, compared with the exact weighted
# sum of their deltas, layer by layer:

# %%
weights = [0.7, 0.3]
pair = ["math-expert", "code-assistant"]
combos = {"linear": dict(combination_type="linear"),
          "cat": dict(combination_type="cat"),
          "svd, rank 4": dict(combination_type="svd", svd_rank=4),
          "svd, rank 8": dict(combination_type="svd", svd_rank=8)}
for i, (label, kw) in enumerate(combos.items()):
    model.add_weighted_adapter(pair, weights, f"mix{i}", **kw)

errors = {label: [] for label in combos}
for name, layer in model.lora_layers():
    target = sum(w * layer.get_delta_weight(a) for a, w in zip(pair, weights))   # Σ w_i ΔW_i, (out, in)
    for i, label in enumerate(combos):
        got = layer.get_delta_weight(f"mix{i}")
        errors[label].append(np.linalg.norm(got - target) / np.linalg.norm(target))
print(f"{'combination':<12} {'new rank':>8}  relative error ||ΔW_new − Σ w_i ΔW_i|| / ||Σ w_i ΔW_i||")
for i, label in enumerate(combos):
    rank = model.peft_config[f"mix{i}"].r
    print(f"{label:<12} {rank:>8}  max over {len(errors[label])} layers {max(errors[label]):.2e}, "
          f"mean {np.mean(errors[label]):.2e}")

# %% [markdown]
# The truncated SVD's error is exactly what Eckart–Young predicts: the dropped singular values of the
# target. And at the model level, the exact `cat` adapter is the reference the others miss:

# %%
name, layer = model.lora_layers()[0]
target = sum(w * layer.get_delta_weight(a) for a, w in zip(pair, weights))
sv = np.linalg.svd(target.astype(np.float64), compute_uv=False)
predicted = np.sqrt((sv[4:] ** 2).sum()) / np.linalg.norm(target)
print(f"{name}: svd rank 4 error {errors['svd, rank 4'][0]:.4e}, dropped singular values predict {predicted:.4e}")

model.set_adapter("mix1")                                 # cat: exact
reference = model(ids).numpy()
for i, label in enumerate(combos):
    model.set_adapter(f"mix{i}")
    print(f"{label:<12} logits vs the exact (cat) combination: max diff {np.abs(model(ids).numpy() - reference).max():.2e}")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
labels = list(combos)
means = [max(np.mean(errors[k]), 1e-9) for k in labels]       # floor: a log axis cannot show 0
left.bar(labels, means, color=["tab:red", "tab:green", "tab:orange", "tab:olive"])
left.set_yscale("log")
left.axhline(2.0 ** -24, color="grey", ls=":", lw=1)
left.text(-0.4, 2.0 ** -24 * 1.2, "float32 rounding (2^-24)", color="grey", fontsize=8, va="bottom")
left.set_ylabel("mean relative error of ΔW over layers")
left.set_title("add_weighted_adapter vs the exact weighted sum")
right.semilogy(np.arange(1, len(sv) + 1), sv, "o-", ms=3)
right.axvline(4.5, color="tab:orange", ls="--", lw=1)
right.text(4.2, sv[-1], "svd_rank = 4 keeps 1-4", color="tab:orange", fontsize=8, rotation=90,
           va="bottom", ha="right")
right.axvline(8.5, color="grey", ls=":", lw=1)
right.text(8.9, sv[-1], "rank of Σ w_i ΔW_i ≤ 4 + 4", color="grey", fontsize=8, rotation=90,
           va="bottom")
right.set_xlim(0, 24)
right.set_ylim(max(sv.min(), 1e-9), sv.max() * 3)
right.set_xlabel("singular value index")
right.set_ylabel("singular value")
right.set_title(f"singular values of Σ w_i ΔW_i ({name})")
fig.tight_layout()
plt.show()

# %% [markdown]
# The weighted sum of two rank-4 updates has rank 8: singular values 9 onwards are rounding noise.
# `cat` reproduces it exactly (error at float32 rounding) at rank 8; `svd` with rank 8 does too, and
# with rank 4 it keeps the best half; `linear` adds cross terms $B_1A_2$, $B_2A_1$ that nobody trained,
# and its error is of the order of the update itself.
#
# ## What to take away
#
# - Merging is $W_0 + \Delta W$, rounded once to $W_0$'s dtype; unmerging subtracts the same $\Delta W$.
#   The output changes only by that rounding.
# - In float16 the rounding is relative to $W_0$: a small adapter partly **vanishes** when merged.
# - A fixed adapter merged and unmerged any number of times drifts by one rounding; an adapter that
#   changes between cycles drifts like a random walk. Keep $W_0$ if you need it back exactly.
# - Swapping adapters is `set_adapter`; with merged weights, unmerge first.
# - Only `cat` combines adapters exactly (at the sum of the ranks); `svd` is the best fixed-rank
#   approximation; `linear` adds cross terms.
