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
# # 07 · NF4 and QLoRA
#
# > QLoRA stores the base model in 4-bit NormalFloat (NF4) while keeping LoRA adapters in 16-bit.
# > Same quality as full 16-bit LoRA at a fraction of the memory. — *What is LoRA?*
#
# QLoRA (Dettmers et al., 2023) changes one thing in LoRA: the frozen base weights $W_0$ are stored
# in 4 bits and dequantized on the fly, while $A$ and $B$ train in full precision on top. This
# notebook takes that 4-bit format apart, using only `minilora.quant` and `minilora.memory`:
#
# 1. the **NF4 code book**, built from normal quantiles step by step;
# 2. **one block quantized by hand**: absmax, normalise, nearest code, two indices per byte;
# 3. **bits per parameter**: 4.5, and 4.127 with **double quantization**, read off the stored arrays;
# 4. the **quantization error** of NF4 against FP4 and int4, and where each one is good;
# 5. **memory** for LLaMA 7B and 13B and Llama 3 70B (full fine-tuning, LoRA, QLoRA), and the article's "35 GB";
# 6. a **QLoRA fine-tune** of the shipped base model next to plain LoRA: same seed, same batches.
#
# Every quantizer here matches bitsandbytes 0.50.2 byte for byte (`tests/test_nf4.py` checks it).

# %%
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest (set before NumPy loads)

import time
from statistics import NormalDist

import matplotlib.pyplot as plt
import numpy as np

import minilora
from minilora import memory, quant
from minilora.data import ByteTokenizer, collate, make_instruction_dataset, pretraining_data, random_batches
from minilora.commands.finetune import DEFAULT_TARGETS, exact_match_accuracy, lora_finetune
from minilora.lora import LoraConfig, get_peft_model
from minilora.models import load_base_model
from minilora.quant import codebooks
from minilora.quant.linear import format_quantization_summary, quantization_summary
from minilora.train import evaluate

FAST = os.environ.get("MINILORA_FAST") == "1"   # smaller matrix, fewer steps for quick CI runs
ROWS = 1024 if FAST else 4096                    # the N(0, 1) test matrix is (ROWS, 4096)
STEPS = 40 if FAST else 150                      # optimizer steps for each fine-tune
N_TEST = 35 if FAST else 70                      # held-out instructions scored by exact match
LR, BATCH, SEED = 3e-3, 8, 0                     # notebook 04's recipe (the demo's learning rate)
minilora.manual_seed(SEED)
rng = np.random.default_rng(SEED)
np.set_printoptions(precision=4, suppress=True)
NF4, FP4, INT4 = quant.NF4_CODE, quant.FP4_CODE, quant.INT4_CODE
QUANTIZERS = {"NF4": quant.quantize_nf4, "FP4": quant.quantize_fp4, "int4": quant.quantize_int4}

# %% [markdown]
# ## 1. The NF4 code book, from normal quantiles
#
# A 4-bit index can name 16 values, the **code book**. Pretrained weights are roughly normal, so
# QLoRA puts the 16 values at **quantiles of the standard normal**: each code then stands for about
# the same share of the weights, and no pattern is wasted on a range where few weights fall.
#
# `codebooks.create_normal_map` does this in three steps; here they are written out, with
# `statistics.NormalDist().inv_cdf` as $\Phi^{-1}$ (no SciPy):
#
# 1. **positive half**: 9 evenly spaced probabilities from $p_\text{max}$ down to $0.5$; drop
#    $0.5$ (its quantile is 0); take $\Phi^{-1}$ of the other 8;
# 2. **negative half**: 8 evenly spaced probabilities from $p_\text{max}$ to $0.5$; drop $0.5$; negate
#    the 7 quantiles;
# 3. add one **exact zero**, sort, and divide by the largest value so the ends are exactly $\pm 1$.
#
# $\Phi^{-1}(1) = \infty$, so the outer probability must stay below 1; QLoRA takes
# $p_\text{max} = \frac12\big[(1 - \frac{1}{2\cdot 15}) + (1 - \frac{1}{2\cdot 16})\big] = 0.9677083$.
# The result is **asymmetric** (8 positive values, 7 negative, one zero): a symmetric book with an
# exact zero has an odd number of values, and 16 is even. int4 shows the alternative: it keeps
# symmetry and spends its 16th pattern on a second zero.

# %%
p_max = codebooks.NF4_OFFSET                                   # 0.9677083
phi_inv = NormalDist().inv_cdf                                 # Φ⁻¹, the standard normal quantile
p_pos = codebooks.float32_linspace(p_max, 0.5, 9)[:-1]        # (8,) probabilities, float32 like torch
p_neg = codebooks.float32_linspace(p_max, 0.5, 8)[:-1]        # (7,)
positive = [phi_inv(float(p)) for p in p_pos]                  # 8 quantiles, 1.848 down to 0.118
negative = [-phi_inv(float(p)) for p in p_neg]                 # 7 quantiles, negated
values = np.array(positive + [0.0] + negative, dtype=np.float32)   # (16,), one rounding to float32
values.sort()
nf4_by_hand = values / values.max()                            # divide by Φ⁻¹(p_max) = 1.848: ends at ±1

print(f"p_max = {p_max}, Φ⁻¹(p_max) = {phi_inv(p_max):.4f}")
print("equal to quant.NF4_CODE bit for bit:", np.array_equal(nf4_by_hand, NF4))
print("equal to codebooks.create_normal_map():", np.array_equal(nf4_by_hand, codebooks.create_normal_map()))
probs = np.concatenate([1 - p_neg, [0.5], p_pos[::-1]])     # (16,) the probability behind each code
print(f"\n{'index':>5} {'p':>9} {'Φ⁻¹(p)':>9} {'/ 1.848':>9} {'NF4 code':>10}")
for i, (p, c) in enumerate(zip(probs, NF4)):
    z = phi_inv(float(p)) if p != 0.5 else 0.0
    print(f"{i:>5} {p:>9.5f} {z:>9.4f} {z / phi_inv(p_max):>9.4f} {c:>10.6f}")

# Why float32_linspace: float64 probabilities move some codes by a few units in the last place.
p64_pos, p64_neg = np.linspace(p_max, 0.5, 9)[:-1], np.linspace(p_max, 0.5, 8)[:-1]
v64 = np.array([phi_inv(p) for p in p64_pos] + [0.0] + [-phi_inv(p) for p in p64_neg], np.float32)
v64.sort()
print(f"\nwith float64 probabilities instead: {np.sum(v64 / v64.max() != NF4)} of 16 codes differ "
      "(bitsandbytes builds them in float32)")

# %% [markdown]
# The three code books side by side. NF4's values crowd around 0, where most of a normal block
# lies, and thin out towards $\pm 1$; FP4 (1 sign, 2 exponent, 1 mantissa bit, bitsandbytes' layout)
# crowds even harder and has big gaps at the top; int4 is evenly spaced, $k/7$.

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
z = np.linspace(-2.2, 2.2, 400)
pdf = np.exp(-z ** 2 / 2) / np.sqrt(2 * np.pi)
left.plot(z, pdf, color="k", lw=1.5)
scale = phi_inv(p_max)                                         # NF4's ±1 sit at ±1.848 σ
edges = np.concatenate([[-np.inf], (NF4[:-1] + NF4[1:]) / 2, [np.inf]]) * scale
for i in range(16):
    lo, hi = max(edges[i], -2.2), min(edges[i + 1], 2.2)
    zz = z[(z >= lo) & (z <= hi)]
    left.fill_between(zz, np.exp(-zz ** 2 / 2) / np.sqrt(2 * np.pi), color=f"C{i % 2}", alpha=0.35)
left.vlines(NF4 * scale, 0, 0.03, color="k")
left.set_title("NF4 codes (ticks) on N(0, 1): each shaded bin is one code's range")
left.set_xlabel("weight / σ  (codes scaled by Φ⁻¹(p_max) = 1.848)")

for y, (name, c) in enumerate((("NF4", NF4), ("FP4", FP4), ("int4", INT4))):
    uniq = np.unique(c)
    right.plot(uniq, np.full(uniq.size, y), "o", ms=7, color=f"C{y}")
    right.text(-1.12, y, f"{name}: {uniq.size} distinct", ha="right", va="center")
right.set_yticks([])
right.set_xlim(-1.75, 1.1)
right.set_ylim(-0.6, 2.6)
right.invert_yaxis()
right.set_xlabel("code value (× the block's absmax)")
right.set_title("the 16 patterns of each 4-bit code book")
fig.tight_layout()
plt.show()
print("FP4 holds +0 and -0, int4 holds +0 and -0: both waste one of their 16 patterns")

# %% [markdown]
# ## 2. One block, quantized by hand
#
# Blockwise quantization cuts the flattened weight into blocks of 64 and stores, per block, one
# float32 **absmax** and 64 **4-bit indices**:
#
# 1. $\text{absmax} = \max_i |w_i|$ over the block;
# 2. normalise: $s_i = w_i \cdot \text{fl}(1/\text{absmax}) \in [-1, 1]$ (bitsandbytes multiplies by the
#    float32 reciprocal);
# 3. nearest code: with the 15 midpoints $m_j = (c_j + c_{j+1})/2$, the index is the number of
#    midpoints strictly below $s_i$ (a value exactly on a midpoint takes the **lower** index);
# 4. pack two indices per byte: byte $k$ = `idx[2k] << 4 | idx[2k+1]`, the **even element in the high
#    nibble**.
#
# Dequantizing is one multiply, $\hat w_i = c_{\text{idx}_i} \cdot \text{absmax}$.

# %%
w = (0.02 * rng.standard_normal(64)).astype(np.float32)       # (64,) one block, std 0.02 like Llama's init
absmax = np.abs(w).max()                                       # float32 scalar
scaled = w * (np.float32(1) / absmax)                          # (64,) in [-1, 1]
mid = (NF4[:-1] + NF4[1:]) / np.float32(2)                     # (15,) decision boundaries
idx = np.searchsorted(mid, scaled, side="left").astype(np.uint8)   # (64,) count of midpoints below
packed = (idx[0::2] << 4) | idx[1::2]                          # (32,) bytes: even element -> high nibble
w_hat = NF4[idx] * absmax                                      # (64,) dequantized

print(f"absmax = {absmax:.6f}\n")
print(f"{'i':>2} {'w':>10} {'s = w/absmax':>13} {'index':>6} {'code':>9} {'ŵ':>10} {'ŵ - w':>10}")
for i in range(8):
    print(f"{i:>2} {w[i]:>10.6f} {scaled[i]:>13.4f} {idx[i]:>6} {NF4[idx[i]]:>9.4f} {w_hat[i]:>10.6f} "
          f"{w_hat[i] - w[i]:>10.6f}")
print("\nfirst 4 bytes:", " ".join(f"{b:08b}" for b in packed[:4]),
      "=", " ".join(f"0x{b:02x}" for b in packed[:4]))
print("   high nibbles:", idx[0:8:2], " low nibbles:", idx[1:8:2])
top = np.abs(w).argmax()
print(f"the largest |w| (element {top}) normalises to {scaled[top]:+.1f} and is stored exactly: "
      f"error {w_hat[top] - w[top]}")

q = quant.quantize_nf4(w)
print("\nquant.quantize_nf4(w):", q)
print("same bytes:", np.array_equal(q.packed, packed), "| same absmax:", bool(q.absmax[0] == absmax),
      "| same dequantized values:", np.array_equal(q.dequantize(), w_hat),
      "| unpack_4bit gives the indices back:", np.array_equal(quant.unpack_4bit(q.packed, 64), idx))

# %% [markdown]
# The bins again, now with real weights: `minilora.viz.draw_nf4_bins` quantizes the shipped base
# model's layer-0 `q_proj` (128 × 128) with `quant.quantize_nf4`, divides every block of 64 by the
# absmax it stored, and draws the values over the 16 codes (the first block as ticks underneath). The
# peaks at ±1 are each block's largest weight, which lands exactly on a code.

# %%
from minilora import viz

fig = viz.draw_nf4_bins(load_base_model().model.layers[0].self_attn.q_proj.weight, blocksize=64)
plt.show()

# %% [markdown]
# ## 3. Bits per parameter, and double quantization
#
# Each block of 64 weights stores $64 \times 4$ bits of indices plus one 32-bit absmax:
# $4 + 32/64 = 4.5$ bits per weight. The article's "70B × 0.5 bytes" counts only the 4.
#
# **Double quantization** (QLoRA's second trick) quantizes the absmax values themselves:
#
# 1. subtract their mean (the **offset**; absmax values are all positive, centring them uses both
#    signs of the code);
# 2. quantize the centred values in blocks of 256 to **8 bits** with bitsandbytes' signed *dynamic*
#    map (`quant.DYNAMIC_MAP`: roughly constant relative precision over six decades), keeping one
#    float32 absmax per 256 constants.
#
# Cost: $8/64 + 32/(64 \cdot 256) = 0.127$ bits instead of $0.5$, so **4.127** bits per weight. Below,
# both numbers are read off the arrays a quantized N(0, 1) matrix actually stores.

# %%
W = rng.standard_normal((ROWS, 4096), dtype=np.float32)       # (ROWS, 4096) N(0, 1) weights
stored = {}
for dq in (False, True):
    qW = quant.quantize_nf4(W, blocksize=64, double_quant=dq)
    stored[dq] = qW
    print(f"double_quant={dq}:")
    for name, a in qW.stored_arrays().items():
        print(f"   {name:<14}{str(a.dtype):<9}{str(a.shape):<14}{a.nbytes:>12,} bytes")
    print(f"   total {qW.nbytes:,} bytes for {W.size:,} weights = {8 * qW.nbytes / W.size:.6f} bits/param "
          f"(nf4_bits_per_parameter: {quant.nf4_bits_per_parameter(64, dq):.6f}; "
          f"storage_bytes agrees: {sum(quant.storage_bytes(W.size, 64, dq).values()) == qW.nbytes})")
print(f"\nfloat32 would take {W.nbytes:,} bytes: {W.nbytes / stored[True].nbytes:.2f}x more; "
      f"bfloat16 {W.nbytes // 2:,}: {W.nbytes / 2 / stored[True].nbytes:.2f}x more")

# %% [markdown]
# The second quantization step by step, with the package's 8-bit blockwise quantizer. The
# reconstruction must equal what the `NF4Tensor` uses when it dequantizes:

# %%
blocks = W.reshape(-1, 64)                                     # (n_blocks, 64)
absmax_all = np.abs(blocks).max(axis=1)                        # (n_blocks,) float32, all positive
offset = np.float32(absmax_all.mean(dtype=np.float64))         # one float32 per tensor
codes8, nested = quant.quantize_blockwise_8bit(absmax_all - offset)    # (n_blocks,) uint8, (n_blocks/256,) float32
rebuilt = quant.dequantize_blockwise_8bit(codes8, nested) + offset     # (n_blocks,) float32
print(f"{absmax_all.size:,} absmax values in [{absmax_all.min():.3f}, {absmax_all.max():.3f}], "
      f"offset (mean) {offset:.4f}")
print("equal to the NF4Tensor's own absmax:", np.array_equal(rebuilt, stored[True].absmax))
rel = np.abs(rebuilt - absmax_all) / absmax_all
print(f"relative error of the 8-bit absmax: mean {rel.mean():.2e}, max {rel.max():.2e}")
err = {dq: quant.quantization_error(W, stored[dq].dequantize()) for dq in (False, True)}
print(f"weight RMSE: {err[False]['rmse']:.6f} without, {err[True]['rmse']:.6f} with double quantization "
      f"(+{err[True]['rmse'] / err[False]['rmse'] - 1:.2%}) for {4.5 - 4.126953:.3f} fewer bits per weight")

# %% [markdown]
# The block size trades the same two things: larger blocks mean fewer constants but one outlier
# stretches the scale of more weights. QLoRA's choice is 64 with double quantization.

# %%
sub = W[: min(ROWS, 1024)]                                     # (1024, 4096) is plenty for the sweep
print(f"{'blocksize':>9} | {'bits/param':>10} {'RMSE':>8} | {'bits/param, DQ':>14} {'RMSE, DQ':>9}")
for bs in (32, 64, 128, 256):
    cells = []
    for dq in (False, True):
        qs = quant.quantize_nf4(sub, blocksize=bs, double_quant=dq)
        cells.append((qs.bits_per_parameter, quant.quantization_error(sub, qs.dequantize())["rmse"]))
    print(f"{bs:>9} | {cells[0][0]:>10.4f} {cells[0][1]:>8.5f} | {cells[1][0]:>14.4f} {cells[1][1]:>9.5f}")

# %% [markdown]
# ## 4. Quantization error: NF4 against FP4 and int4
#
# > 4-bit NormalFloat (NF4) — A quantization scheme optimized for normally-distributed weights,
# > achieving near-lossless compression at 4 bits per parameter. — *What is LoRA?*
#
# The same N(0, 1) matrix through each code book, blocksize 64, with `quant.quantization_error`.
# bitsandbytes would give the same errors on this matrix: its NF4 and FP4 bytes are the ones
# minilora stores (`tests/test_nf4.py`).

# %%
q4 = {name: f(W) for name, f in QUANTIZERS.items()}             # blocksize 64, no double quant
deq = {name: q.dequantize() for name, q in q4.items()}         # each (ROWS, 4096) float32
deq["NF4 + DQ"] = stored[True].dequantize()
errors = {name: quant.quantization_error(W, w_hat) for name, w_hat in deq.items()}
print(f"N(0, 1) matrix {W.shape}, blocksize 64")
print(f"{'':<9}{'mean |error|':>13}{'max |error|':>13}{'RMSE':>9}{'SNR (dB)':>10}")
for name, e in errors.items():
    snr = 10 * np.log10(W.var(dtype=np.float64) / e["rmse"] ** 2)
    print(f"{name:<9}{e['mean_abs_error']:>13.5f}{e['max_abs_error']:>13.4f}{e['rmse']:>9.5f}{snr:>10.2f}")

# %% [markdown]
# Three views of where the error comes from: its distribution, its size as a function of the
# weight's value (with the density of N(0, 1) behind it), and how often each of the 16 codes is used
# (a code book that spends its patterns well uses them all about equally: 4 bits of entropy).

# %%
flat = W.reshape(-1)
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
colors = {"NF4": "C0", "FP4": "C1", "int4": "C2"}
bins = np.linspace(-0.7, 0.7, 141)
for name, color in colors.items():
    e = deq[name].reshape(-1) - flat
    axes[0].hist(e, bins=bins, histtype="step", lw=1.5, color=color, label=name)
axes[0].set_yscale("log")
axes[0].set_xlabel("ŵ − w")
axes[0].set_title("error distribution (N(0, 1) weights)")
axes[0].legend()

edges = np.linspace(-4, 4, 81)
centre = (edges[:-1] + edges[1:]) / 2
which = np.clip(np.digitize(flat, edges) - 1, 0, edges.size - 2)          # (n,) bin of each weight
count = np.bincount(which, minlength=centre.size)
dens = axes[1].twinx()
dens.fill_between(centre, count / count.sum(), color="0.85")
dens.set_yticks([])
axes[1].set_zorder(dens.get_zorder() + 1)
axes[1].patch.set_visible(False)
for name, color in colors.items():
    sq = np.bincount(which, weights=(deq[name].reshape(-1) - flat).astype(np.float64) ** 2,
                     minlength=centre.size)
    axes[1].plot(centre, np.sqrt(sq / np.maximum(count, 1)), color=color, label=name)
axes[1].set_xlabel("weight value w (grey: how many weights)")
axes[1].set_ylabel("RMSE of the weights with that value")
axes[1].set_title("error against the weight's value")
axes[1].legend()

entropy = {}
for k, (name, color) in enumerate(colors.items()):
    order = np.argsort(q4[name].code, kind="stable")           # indices in ascending code order
    use = np.bincount(q4[name].indices().reshape(-1), minlength=16)[order] / W.size
    entropy[name] = float(-(use[use > 0] * np.log2(use[use > 0])).sum())
    axes[2].bar(np.arange(16) + (k - 1) * 0.28, use, width=0.28, color=color,
                label=f"{name}: {entropy[name]:.2f} bits")
axes[2].axhline(1 / 16, color="k", ls=":", lw=1)
axes[2].set_xlabel("code, in ascending order of value")
axes[2].set_ylabel("fraction of weights")
axes[2].set_title("how often each code is used (dotted: 1/16)")
axes[2].legend(fontsize=8)
fig.tight_layout()
plt.show()
print("entropy of the 4-bit indices:", {k: round(v, 3) for k, v in entropy.items()})

# %%
from IPython.display import Markdown

p_max = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))       # QLoRA's outer probability (section 1)
fp4_levels = np.unique(np.abs(FP4[FP4 != 0]))                  # FP4's 7 magnitudes, ascending
assert errors["NF4"]["rmse"] < min(errors["FP4"]["rmse"], errors["int4"]["rmse"])
assert max(entropy, key=entropy.get) == "NF4" and errors["int4"]["max_abs_error"] < errors["NF4"]["max_abs_error"]
assert errors["FP4"]["rmse"] == max(e["rmse"] for e in errors.values())
Markdown(f"""
- **NF4 has the lowest mean and RMS error** on normal weights, with its codes used most evenly, which
  is what it was designed for. Used evenly is not used equally: its indices carry
  {entropy['NF4']:.3f} bits of entropy, not 4 (FP4's {entropy['FP4']:.3f}, int4's {entropy['int4']:.3f}).
  The bins are not equiprobable because a block is scaled by its own absmax (on average
  ${offset:.1f}\\sigma$ for 64 normal values, the offset printed in section 3), not by the
  ${NormalDist().inv_cdf(p_max):.3f}\\sigma$ of the code book's outermost quantile, so the values crowd
  towards the middle codes and the outer codes are used less. "Optimal" for NF4 is the quantile
  construction's promise for values spread like the normal's quantiles, not a measured 4 bits.
- **int4 has the smallest worst case** ({errors['int4']['max_abs_error']:.3f} against NF4's
  {errors['NF4']['max_abs_error']:.3f}). Its even spacing leaves no wide gap, while NF4's and FP4's
  widest gaps are near $\\pm 1$: a weight just below the block's largest lands far from any code.
  Those weights are rare, so the RMSE still favours NF4.
- **FP4 is worst on both counts here**: it spends codes on tiny values ($\\pm {fp4_levels[0]:.6f}$,
  that is $\\pm 0.0625/12$) and leaves a gap of {fp4_levels[-1] - fp4_levels[-2]:.3f} of the absmax
  between its two largest codes, {fp4_levels[-2]:.4f} and {fp4_levels[-1]:.0f}.
""")

# %% [markdown]
# "Optimized for normally-distributed weights" is a real condition, not a slogan. The same comparison
# on **uniform** weights, and on the **shipped base model's** own Linear weights (one matrix at a time,
# as QLoRA stores them), error relative to each matrix's standard deviation:

# %%
base = load_base_model()
linear_weights = [p.data for n, p in base.named_parameters()
                  if p.data.ndim == 2 and "embed_tokens" not in n and "lm_head" not in n]  # 28 matrices


def relative_rmse(f, mats):
    # RMSE over every weight, divided by the weights' standard deviation (pooled)
    sq = sum(np.sum((f(m).dequantize() - m).astype(np.float64) ** 2) for m in mats)
    n = sum(m.size for m in mats)
    var = sum(np.sum(m.astype(np.float64) ** 2) for m in mats) / n - (sum(m.sum() for m in mats) / n) ** 2
    return float(np.sqrt(sq / n / var))


def excess_kurtosis(x):
    x = x.astype(np.float64).reshape(-1) - x.mean()
    return float((x ** 4).mean() / (x ** 2).mean() ** 2 - 3)


samples = {"N(0, 1)": [W[:1024]], "uniform(-1, 1)": [rng.uniform(-1, 1, (1024, 4096)).astype(np.float32)],
           "base model Linear weights": linear_weights}
kurt = {label: excess_kurtosis(np.concatenate([m.reshape(-1) for m in mats])) for label, mats in samples.items()}
rel_rmse = {label: {name: relative_rmse(f, mats) for name, f in QUANTIZERS.items()} for label, mats in samples.items()}
print(f"{'weights':<27}{'excess kurtosis':>16}" + "".join(f"{name:>8}" for name in QUANTIZERS))
for label in samples:
    print(f"{label:<27}{kurt[label]:>16.2f}" + "".join(f"{v:>8.4f}" for v in rel_rmse[label].values()))

# %%
real = "base model Linear weights"
assert min(rel_rmse["uniform(-1, 1)"], key=rel_rmse["uniform(-1, 1)"].get) == "int4"
assert min(rel_rmse[real], key=rel_rmse[real].get) == "NF4"
Markdown(f"""
On uniform weights int4 wins clearly: evenly spaced codes are optimal for evenly spread values,
and NF4 wastes resolution near zero. The base model's weights are close enough to normal (excess
kurtosis {kurt[real]:.2f}, against {kurt['N(0, 1)']:.2f} for the normal sample and
{kurt['uniform(-1, 1)']:.2f} for the uniform one: {'slightly heavier' if kurt[real] > 0 else 'lighter'}
tails) that NF4 keeps its advantage, as it does for real LLMs.
""")

# %% [markdown]
# "Near-lossless" is a claim about the *model*, not the matrix. Quantize every Linear of the shipped
# base model (all but `lm_head`, as bitsandbytes does) and score it on held-out pretraining text:

# %%
tok = ByteTokenizer()
_, pretrain_val = pretraining_data(tok)                        # held-out stdlib docstrings
text_batches = [random_batches(pretrain_val, 16, 128, np.random.default_rng(SEED + i))
                for i in range(2 if FAST else 6)]              # fixed (16, 128) windows, notebook 04's
bases = {"float32": base}
for name, qt in (("NF4", "nf4"), ("FP4", "fp4"), ("int4", "int4")):
    bases[name] = quant.quantize_model(load_base_model(), quant_type=qt)   # double_quant=True by default
text_loss = {name: evaluate(m, text_batches) for name, m in bases.items()}
print(f"{'base model':<10}{'bits/param':>11}{'size':>11}{'text loss':>11}{'Δ loss':>9}")
for name, m in bases.items():
    s = quantization_summary(m)
    bits = s["bits_per_parameter"] if s["quantized_parameters"] else 32.0
    print(f"{name:<10}{bits:>11.4f}{s['total_bytes'] / 1024:>7.0f} KiB{text_loss[name]:>11.4f}"
          f"{text_loss[name] - text_loss['float32']:>+9.4f}")
print()
print(format_quantization_summary(quantization_summary(bases["NF4"])))

# %%
summary = quantization_summary(bases["NF4"])
loss_rise = {name: text_loss[name] / text_loss["float32"] - 1 for name in QUANTIZERS}
sizes = sorted({p.data.size for n, p in base.named_parameters()
                if p.data.ndim == 2 and "embed_tokens" not in n and "lm_head" not in n})   # weights per matrix
n_abs = sizes[-1] // 64                                         # absmax values of the largest matrix
n_float = summary["float_parameters"]                            # embeddings, norms, lm_head
n_all = summary["quantized_parameters"] + n_float
Markdown(f"""
All three 4-bit bases lose little ({min(loss_rise.values()):.1%} to {max(loss_rise.values()):.1%} of the
loss): NF4 loses {text_loss['NF4'] - text_loss['float32']:.4f} and int4
{text_loss['int4'] - text_loss['float32']:.4f} (although int4's weight error above is
{errors['int4']['rmse'] / errors['NF4']['rmse'] - 1:.0%} larger), and FP4
{text_loss['FP4'] - text_loss['float32']:.4f}. Two details in the summary: the measured
{summary['bits_per_parameter']:.4f} bits per parameter is a little above
{quant.nf4_bits_per_parameter(64, double_quant=True):.3f} because each of these small matrices
({' or '.join(f'{n:,}' for n in sizes)} weights) pays its own offset and nested absmax (the
{sizes[-1]:,}-weight ones fill only {n_abs} of their {-(-n_abs // 256) * 256} nested slots); and the
whole model shrinks {summary['ratio']:.1f}x, not the
{32 / quant.nf4_bits_per_parameter(64, double_quant=True):.2f}x of a single matrix, because the
embeddings, norms and `lm_head` ({n_float:,} of its {n_all:,} parameters,
{n_float / n_all:.0%}) stay in float32. In Llama-7B they are
{1 - memory.count_parameters('llama-7b')['linear'] / memory.count_parameters('llama-7b')['total']:.0%}
of the parameters.
""")

# %% [markdown]
# ## 5. Memory for 7B, 13B and 70B: full, LoRA, QLoRA
#
# What one parameter costs while training (`memory.bytes_per_parameter`), against the article's
# Quick Reference:
#
# > full fine-tune: ~16 bytes per param (model + grads + optim) · LoRA: ~2 bytes per trainable param +
# > 2 bytes per frozen param · QLoRA: ~0.5 bytes per frozen param (4-bit) + 2 bytes per LoRA param

# %%
print(f"{'method':<7}{'role':<20}{'weight':>8}{'grad':>6}{'optim':>7}{'NF4 consts':>12}{'total':>9}")
for method in memory.METHODS:
    for role, c in memory.bytes_per_parameter(method).items():
        if method == "full" and role != "trainable":
            continue
        print(f"{method:<7}{role:<20}{c.weights:>8g}{c.gradients:>6g}{c.optimizer:>7g}"
              f"{c.quant_constants:>12.4f}{c.total:>9.4f}")
print(f"\nQLoRA's frozen bytes from the stored arrays of section 3: {stored[True].nbytes / W.size:.4f} "
      f"(double quant), {stored[False].nbytes / W.size:.4f} (without)")

# %% [markdown]
# The frozen 0.5 holds only for the 4-bit codes (0.516 with their constants). The "2 bytes per
# trainable param" is the adapter's weight alone: while training, a LoRA parameter also has a gradient,
# AdamW's two moments and an fp32 master copy, 16 bytes, the same as in full fine-tuning. It matters
# little because there are so few of them.
#
# Whole models, with the article's adapter (r = 16 on q, k, v, o), 16-bit weights, AdamW; activations
# are not counted. The presets are the published shapes of LLaMA 7B and 13B and of Llama 3 70B, the
# article's 70B (`PRESETS["llama3-70b"]`: grouped-query attention and a 128K vocabulary). GB = $10^9$ bytes; GPU cards are sold by GiB, so an "80GB" A100 holds
# 85.9 GB.

# %%
PRESETS_SHOWN = {"7B": "llama-7b", "13B": "llama-13b", "70B": "llama3-70b"}   # the article's 70B is Llama 3's
MODEL_NAMES = {"7B": "LLaMA 7B", "13B": "LLaMA 13B", "70B": "Llama 3 70B"}
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHOD_NAMES = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}
mem = {(size, m): memory.memory_breakdown(preset, m, r=16, target_modules=QKVO)
       for size, preset in PRESETS_SHOWN.items() for m in memory.METHODS}
print(f"{'model':<6}{'parameters':>16}{'method':>7}{'trainable':>15}{'GB':>9}{'A100-80GB':>11}"
      f"{'fits 24GB':>10}{'fits 48GB':>10}")
for (size, m), mb in mem.items():
    print(f"{size:<6}{mb.total_params:>16,}{METHOD_NAMES[m]:>7}{mb.trainable_params:>15,}{mb.gb():>9.1f}"
          f"{memory.gpus_needed(mb.total, 80):>11}{str(memory.fits_on(mb.total, 24)):>10}"
          f"{str(memory.fits_on(mb.total, 48)):>10}")

# %%
parts = [("weights", "base weights (16-bit, or NF4 codes)", "tab:gray"),
         ("quant_constants", "NF4 constants", "tab:purple"), ("adapter", "adapter weights", "tab:green"),
         ("gradients", "gradients", "tab:orange"), ("optimizer", "AdamW state + fp32 master", "tab:red")]
cards = [(24, "24GB card", "tab:olive"), (48, "48GB card", "tab:cyan"), (80, "A100 80GB", "tab:blue")]
fig, axes = plt.subplots(1, 4, figsize=(18, 4.6), gridspec_kw={"width_ratios": [1, 1, 1, 1.4]})
for ax, size in zip(axes, PRESETS_SHOWN):
    runs = [mem[(size, m)] for m in memory.METHODS]
    bottom = np.zeros(len(runs))
    for attr, label, color in parts:
        vals = np.array([mb.gb(attr) for mb in runs])
        ax.bar(range(len(runs)), vals, bottom=bottom, color=color, label=label, width=0.6)
        bottom += vals
    for i, mb in enumerate(runs):
        n = memory.gpus_needed(mb.total, 80)
        ax.text(i, bottom[i], f"{mb.gb():.1f} GB\n{n} × A100-80", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(runs)), [METHOD_NAMES[m] for m in memory.METHODS])
    ax.set_ylim(0, bottom.max() * 1.25)
    ax.set_title(f"{MODEL_NAMES[size]} ({runs[0].total_params / 1e9:.2f}B parameters)")
axes[0].set_ylabel("training memory, GB (activations not included)")
axes[0].legend(fontsize=7, loc="upper right")

zoom = axes[3]                                                 # LoRA and QLoRA totals against the cards
x = np.arange(len(PRESETS_SHOWN))
for j, (m, color) in enumerate((("lora", "tab:gray"), ("qlora", "tab:purple"))):
    totals = [mem[(size, m)].gb() for size in PRESETS_SHOWN]
    zoom.bar(x + (j - 0.5) * 0.38, totals, width=0.38, color=color, label=METHOD_NAMES[m])
    for xi, t in zip(x, totals):
        zoom.text(xi + (j - 0.5) * 0.38, t, f"{t:.1f}", ha="center", va="bottom", fontsize=8)
for gib, label, color in cards:
    gb = gib * memory.GiB / memory.GB                          # cards are sold by GiB
    zoom.axhline(gb, color=color, ls=":", lw=1.2)
    zoom.text(-0.45, gb, f"{label} = {gb:.1f} GB", color=color, va="bottom", fontsize=8)
zoom.set_xticks(x, [MODEL_NAMES[s] for s in PRESETS_SHOWN])
zoom.set_ylim(0, 160)
zoom.set_title("LoRA and QLoRA against the cards (GB)")
zoom.legend(loc="upper center", fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# Llama-7B alone, as `minilora.viz.draw_memory_bars` draws it: each bar is one
# `memory.memory_breakdown` (r = 16 on q, k, v, o, AdamW), split into its parts, against a 24 GiB and
# an 80 GiB card.

# %%
from minilora import viz

fig = viz.draw_memory_bars("llama-7b", r=16, target_modules=QKVO)
plt.show()

# %% [markdown]
# ### The article's "70B × 0.5 bytes (NF4) ≈ 35 GB"
#
# The article's 70B is Llama 3 70B (`PRESETS["llama3-70b"]`: 70.55B parameters, a 128K vocabulary).
# From the bare "70B × 4 bits" to what QLoRA actually stores, one assumption at a time:

# %%
counts = memory.count_parameters("llama3-70b")
n_total, n_linear = counts["total"], counts["linear"]          # every parameter; the decoder's Linear weights
n_kept = n_total - n_linear                                    # embeddings, lm_head, norms: kept in 16-bit
bits_dq = quant.nf4_bits_per_parameter(64, double_quant=True)  # 4.126953
bits_plain = quant.nf4_bits_per_parameter(64, double_quant=False)   # 4.5
GB = memory.GB
ladder = [
    ("70e9 × 0.5 B (the article)", 70e9 * 0.5),
    ("Llama 3 70B: all 70.55B parameters × 0.5 B", n_total * 0.5),
    ("only the decoder Linear weights in 4 bits, the rest in 16-bit",
     n_linear * 0.5 + n_kept * 2),
    ("+ NF4 constants, double quantized (4.127 bits)", n_linear * bits_dq / 8 + n_kept * 2),
    ("   the same without double quantization (4.5 bits)", n_linear * bits_plain / 8 + n_kept * 2),
]
for label, b in ladder:
    print(f"{label:<64}{b / GB:>7.2f} GB")
mb = memory.memory_breakdown("llama3-70b", "qlora", r=16, target_modules=QKVO)
print(f"\nmemory.memory_breakdown(...).gb('base'): {mb.gb('base'):.2f} GB "
      f"({n_linear:,} parameters in NF4, {n_kept:,} in 16-bit)")
print(f"with the bits measured on section 3's matrix ({stored[True].bits_per_parameter:.5f}): "
      f"{(n_linear * stored[True].bits_per_parameter / 8 + n_kept * 2) / GB:.2f} GB")
print(f"QLoRA total with the adapter's training state: {mb.gb():.1f} GB = {mb.gib():.1f} GiB "
      f"(article: ~40 GB); one A100 80GB: {memory.fits_on(mb.total, 80)}, one 48GB card: "
      f"{memory.fits_on(mb.total, 48)}")

# %%
lora_70b = memory.memory_breakdown("llama3-70b", "lora", r=16, target_modules=QKVO)
base_dq, base_plain = ladder[3][1], ladder[4][1]
Markdown(f"""
So "≈ 35 GB" is the 4-bit codes of 70 billion weights and nothing else. The stored base is
**{base_dq / GB:.1f} GB** ({base_plain / GB:.1f} GB without double quantization): keeping the embeddings,
norms and `lm_head` ({n_kept / 1e9:.1f}B parameters, most of them from Llama 3's
{memory.as_config('llama3-70b').vocab_size:,}-token vocabulary) in 16-bit adds
{(ladder[2][1] - ladder[1][1]) / GB:.1f} GB, and the absmax constants add {(base_dq - ladder[2][1]) / GB:.1f} GB
even after double quantization. The article's "Total ~40 GB" and "Runs on 1× A100 80GB" still hold
({mb.gb():.1f} GB before activations), and so does QLoRA's headline, a 65B model on one 48 GB card
(`docs/article-check.md`, `qlora-65b-48gb`). Its "Needs ~4× A100 80GB" for plain LoRA does not:
{lora_70b.gb():.0f} GB fit on {memory.gpus_needed(lora_70b.total, 80)}.
""")

# %% [markdown]
# ## 6. A QLoRA fine-tune next to LoRA
#
# Same base model, same adapter (`LoraConfig(r=8, lora_alpha=16)` on q, k, v, o, as in `minilora
# demo`), same seed, batches, learning rate and steps (notebook 04's recipe). The only difference:
# `get_peft_model(..., quantize="nf4", double_quant=True)` first stores every Linear but `lm_head` in
# NF4, and the adapters train in float32 on top of the 4-bit weights, which are dequantized for every
# matrix product (forward and backward) and never get a gradient.

# %%
train_set, test_set = make_instruction_dataset(2000, N_TEST, seed=SEED)
test_batches = [collate(test_set[i:i + 64], tok, 128) for i in range(0, len(test_set), 64)]
config = LoraConfig(r=8, lora_alpha=16, target_modules=DEFAULT_TARGETS)
models = {}
for name, q in (("LoRA", None), ("QLoRA", "nf4")):
    base_model = load_base_model()
    minilora.manual_seed(SEED)    # after loading, as lora_finetune seeds it: notebook 04's initialisation
    models[name] = get_peft_model(base_model, config, quantize=q, double_quant=True)
print(models["QLoRA"].base_model.model.model.layers[0].self_attn.q_proj)
models["QLoRA"].print_trainable_parameters()
print(format_quantization_summary(quantization_summary(models["QLoRA"])))
same_A = all(np.array_equal(a.lora_A["default"].weight.data, b.lora_A["default"].weight.data)
             for (_, a), (_, b) in zip(models["LoRA"].lora_layers(), models["QLoRA"].lora_layers()))
print("identical adapter initialisation in both models:", same_A)
start = {name: evaluate(m, test_batches) for name, m in models.items()}   # B = 0: the base alone
print("held-out loss before training (the base models):", {k: round(v, 4) for k, v in start.items()})

# %%
hist, wall = {}, {}
for name, model in models.items():
    t0 = time.perf_counter()
    models[name], hist[name] = lora_finetune(model, config, train_set, tok, steps=STEPS, lr=LR,
                                             batch_size=BATCH, seed=SEED, eval_examples=test_set,
                                             eval_every=max(STEPS // 5, 1), progress=False)
    wall[name] = time.perf_counter() - t0
    print(f"{name}: {STEPS} steps in {wall[name]:.1f} s ({wall[name] / STEPS * 1e3:.0f} ms per step)")


# %%
def smooth(values, k=15):
    return np.convolve(values, np.ones(k) / k, mode="valid")   # running mean over k steps


k = min(15, STEPS // 3)
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
for (name, h), color, lw in zip(hist.items(), ("C0", "C3"), (4, 1.5)):
    steps = np.array([r["step"] for r in h])
    losses = np.array([r["loss"] for r in h])
    left.plot(steps, losses, color=color, alpha=0.2, lw=0.8)
    left.plot(steps[k - 1:], smooth(losses, k), color=color, lw=lw, alpha=0.8,
              label=f"{name} (mean of {k} steps)")
    ev = [(0, start[name])] + [(r["step"], r["eval_loss"]) for r in h if "eval_loss" in r]
    right.plot(*zip(*ev), "o-", color=color, label=name)
left.set_xlabel("step")
left.set_ylabel("training loss (nats / answer byte)")
left.set_title("training loss: float32 base vs NF4 base")
left.legend()
right.set_xlabel("step")
right.set_ylabel("held-out loss (nats / answer byte)")
right.set_title("loss on the held-out instructions")
right.legend()
fig.tight_layout()
plt.show()

# %%
final = {}
print(f"{'':<7}{'accuracy':>9}{'held-out loss':>15}{'text loss':>11}{'ms/step':>9}{'model size':>12}")
for name, model in models.items():
    final[name] = {"accuracy": exact_match_accuracy(model, test_set, tok)[0],
                   "held-out loss": evaluate(model, test_batches), "text loss": evaluate(model, text_batches),
                   "bytes": quantization_summary(model)["total_bytes"]}
    r = final[name]
    print(f"{name:<7}{r['accuracy']:>9.1%}{r['held-out loss']:>15.3f}{r['text loss']:>11.3f}"
          f"{wall[name] / STEPS * 1e3:>9.0f}{r['bytes'] / 1024:>8.0f} KiB")

# Did the two adapters learn the same update? cosine similarity of ΔW = (α/r)·B·A, layer by layer
cos = []
for (n, a), (_, b) in zip(models["LoRA"].lora_layers(), models["QLoRA"].lora_layers()):
    da, db = a.get_delta_weight("default").reshape(-1), b.get_delta_weight("default").reshape(-1)
    cos.append(float(da @ db / (np.linalg.norm(da) * np.linalg.norm(db))))
print(f"\ncosine similarity of the learned ΔW, LoRA vs QLoRA, over {len(cos)} layers: "
      f"mean {np.mean(cos):.3f}, min {np.min(cos):.3f}")

# %% [markdown]
# ## What the numbers say
#
# The cell below writes this section from the values computed above, so its figures are this run's.

# %%
mem7 = {m: mem[("7B", m)] for m in memory.METHODS}
text = {name: final[name]["text loss"] for name in final}
hits = {name: round(final[name]["accuracy"] * len(test_set)) for name in final}
rmse = {name: errors[name]["rmse"] / float(W.std(dtype=np.float64)) for name in ("NF4", "FP4", "int4")}
Markdown(f"""
- **The code book** is the standard normal's quantiles, asymmetric ({int((NF4 > 0).sum())} positive,
  {int((NF4 < 0).sum())} negative, an exact zero), built bit for bit with `statistics.NormalDist` and
  float32 probabilities.
- **Bits per parameter** is {quant.nf4_bits_per_parameter(64, double_quant=False):g} for plain blockwise
  NF4 and **{quant.nf4_bits_per_parameter(64, double_quant=True):.3f}** with double quantization, read
  off the stored arrays; double quantization costs a negligible
  {err[True]['rmse'] / err[False]['rmse'] - 1:.2%} of RMSE.
- **NF4 beats FP4 and int4 on normal weights** in mean and RMS error (RMSE {rmse['NF4']:.3f}σ against
  FP4's {rmse['FP4']:.3f}σ and int4's {rmse['int4']:.3f}σ), but not in the worst case (int4's is
  smaller), and **not on uniform weights**, where int4 wins clearly: "optimized for
  normally-distributed weights" is the condition that matters. Its indices carry
  {entropy['NF4']:.3f} bits of entropy, not the 4 an equiprobable code book would.
- **"Near-lossless"** is fair on this model: the NF4 base's loss on held-out pretraining text rises by
  {loss_rise['NF4']:.1%} (int4's by {loss_rise['int4']:.1%}, FP4's by {loss_rise['FP4']:.1%}).
- **Memory**: the article's 35 GB for a 70B base leaves out the quantization constants and the
  16-bit embeddings; Llama 3 70B's stored base is {base_dq / GB:.1f} GB. The total
  ({mb.gb():.1f} GB, one 80 GB card) holds. For LLaMA 7B the stored base drops from
  {mem7['lora'].gb('base'):.1f} GB to {mem7['qlora'].gb('base'):.1f} GB and QLoRA trains in
  {mem7['qlora'].gb():.1f} GB before activations, small enough for a consumer card.
- **The fine-tune** ({STEPS} steps, one seed): the LoRA run is notebook 04's (the same initialisation,
  batches, steps and evaluation windows, so the same figures). The two training curves lie on top of
  each other, and both reach about the same exact-match accuracy ({final['LoRA']['accuracy']:.1%} and
  {final['QLoRA']['accuracy']:.1%}: {hits['LoRA']} and {hits['QLoRA']} answers right of
  {len(test_set)}; notebook 04's per-task table shows what such a run learns: the tasks that read the
  word off the prompt, not yet those that transform it). QLoRA's held-out loss ends
  {abs(final['QLoRA']['held-out loss'] / final['LoRA']['held-out loss'] - 1):.1%}
  {'higher' if final['QLoRA']['held-out loss'] > final['LoRA']['held-out loss'] else 'lower'} than LoRA's
  ({final['QLoRA']['held-out loss']:.3f} against {final['LoRA']['held-out loss']:.3f}). The two adapters
  learn similar updates (cosine similarity of $\\Delta W$ {np.mean(cos):.2f} on average), and both
  forget about as much (pretraining-text loss {text['LoRA']:.2f} for LoRA and {text['QLoRA']:.2f} for
  QLoRA). So "same quality as 16-bit LoRA" holds here within one seed's noise, for a model
  {final['LoRA']['bytes'] / final['QLoRA']['bytes']:.1f}x smaller in memory.
- **Time**: a QLoRA step dequantizes every frozen weight twice (forward and backward); in this run
  its {STEPS} steps took {wall['QLoRA'] / wall['LoRA']:.2f} times as long as LoRA's (the ratio varies
  from run to run on a busy machine). The saving is memory, not time.
  (minilora keeps $A$ and $B$ in float32, as PEFT does by default; the article's "adapters in 16-bit"
  is the compute type of a typical bitsandbytes setup.)
- **Not shown here**: the article's third technique, *paged optimizers*, only matters when GPU
  memory runs short mid-step. `minilora.paged_optim.PagedAdamW` implements a teaching version (m and
  v in pinned host memory, streamed to the GPU per update); on the CPU it is exactly AdamW.
""")
