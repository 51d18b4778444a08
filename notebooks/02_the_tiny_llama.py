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
# # 02 · The tiny Llama
#
# LoRA adapts the projections inside a transformer: $W_q, W_k, W_v, W_o$ and the MLP's three
# matrices. Before adapting them, it helps to see what they do. minilora ships a small byte-level
# Llama (`minilora.models.load_base_model()`), pretrained on the docstrings of Python's standard
# library mixed with synthetic *copy drills* (a quarter of the training bytes: made-up words that come
# back later in the same record, so that the model learns to copy from its context; the model's
# README has the details): same architecture as Llama, 4 layers of width 128. This notebook:
#
# - walks a prompt through the **embedding and one decoder block**, one submodule at a time, with the
#   shape of every intermediate, and checks the result against the block itself;
# - shows the **RoPE** rotation angles and why they make attention depend on *relative* position;
# - plots the **attention maps** of every head for a short English prompt;
# - compares **greedy decoding, temperature and top-k** sampling;
# - counts the **parameters** per module, and compares the proportions with Llama-7B.
#
# Shapes follow PyTorch and Hugging Face: B batch, T sequence, C hidden (128), H heads (4), D head
# dimension (C / H = 32), V vocabulary (259 = 256 bytes + 3 special tokens).

# %%
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest (set before NumPy loads)

import matplotlib.pyplot as plt
import numpy as np

import minilora
from minilora import Tensor, memory, no_grad
from minilora import functional as F
from minilora.data import ByteTokenizer
from minilora.models import PRESETS, load_base_model, rope_inverse_frequencies, sample_next_token

FAST = os.environ.get("MINILORA_FAST") == "1"   # shorter samples for quick CI runs
minilora.manual_seed(0)
np.set_printoptions(precision=4, suppress=True)

model = load_base_model().eval()
tok = ByteTokenizer()
config = model.config
print(model.extra_repr())
print(model.model.layers[0])            # every block looks like this one

# %% [markdown]
# ## 1. From text to vectors
#
# The tokenizer is bytes: every UTF-8 byte is a token id in 0..255, so "The" is three tokens. The
# embedding is a lookup table $E$ (V, C): token $t$ becomes row $E_t$.

# %%
prompt = "The function returns a list of the"
ids = np.array([tok.encode(prompt)])                     # (B, T) = (1, 34): one id per byte
B, T = ids.shape
C, H, D = config.hidden_size, config.num_attention_heads, config.head_dim
print(f"{prompt!r} -> ids {ids[0, :8].tolist()} ... shape {ids.shape}")

with no_grad():
    x = model.model.embed_tokens(ids)                    # (B, T, C): row ids[b, t] of the (V, C) table
print("embedding table", model.model.embed_tokens.weight.shape, "-> x", x.shape)
print("row 'T' of the table is x[0, 0]:",
      np.array_equal(x.numpy()[0, 0], model.model.embed_tokens.weight.numpy()[ord("T")]))

# %% [markdown]
# ## 2. One decoder block, one step at a time
#
# A Llama block is pre-norm with two residual branches:
#
# $$x \leftarrow x + \text{Attention}(\text{RMSNorm}(x)), \qquad x \leftarrow x + \text{MLP}(\text{RMSNorm}(x)).$$
#
# **RMSNorm** rescales each position's vector to unit root-mean-square, then multiplies by a learned
# gain $g$: $\;\text{RMSNorm}(x) = x \,/\, \sqrt{\tfrac1C \sum_i x_i^2 + \varepsilon} \odot g$ (no mean
# subtraction, no bias, unlike LayerNorm).

# %% [markdown]
# The whole block, drawn by `minilora.viz.draw_decoder_block` from this model's config: every box
# carries its submodule's name and weight shape (out × in), and the two projections PEFT adapts by
# default for Llama, `q_proj` and `v_proj`, are highlighted with the parameters a rank-8 adapter adds
# to each. The steps below follow it from the bottom up.

# %%
from minilora import viz

fig = viz.draw_decoder_block(("q_proj", "v_proj"), config=config, r=8)
plt.show()

# %%
layer = model.model.layers[0]
attn, mlp = layer.self_attn, layer.mlp

with no_grad():
    h = layer.input_layernorm(x)                         # (B, T, C) = (1, 34, 128)
    rms = np.sqrt(((h.numpy() / layer.input_layernorm.weight.numpy()) ** 2).mean(axis=-1))  # (B, T)
print("h = RMSNorm(x):", h.shape, "  rms of h / g per position:", rms[0, :4], "...")
print("rms of x per position:", np.sqrt((x.numpy() ** 2).mean(-1))[0, :4], "... (the norm undoes it)")

# %% [markdown]
# **Projections.** Three Linear layers (each weight (out, in) = (128, 128), no bias) turn every
# position into a query, a key and a value; each is then split into $H = 4$ heads of $D = 32$
# features. These are the matrices LoRA most often adapts (q and v in the LoRA paper).

# %%
with no_grad():
    q = attn.q_proj(h).reshape(B, T, H, D)               # (B, T, C) @ (C, C)^T -> (B, T, C) -> (B, T, H, D)
    k = attn.k_proj(h).reshape(B, T, H, D)               # (B, T, H, D); here num_key_value_heads = H
    v = attn.v_proj(h).reshape(B, T, H, D)               # (B, T, H, D)
print("q_proj.weight", attn.q_proj.weight.shape, " q", q.shape, " k", k.shape, " v", v.shape)

# %% [markdown]
# **RoPE** (section 3 has more) rotates each query and key by an angle proportional to its
# position. The model keeps the cos/sin tables (`model.model.rotary`); the rotation is the fused op
# `F.rotary_embedding`.

# %%
cos, sin = model.model.rotary(T)                         # (T, D) each: cos/sin of position * theta_i
with no_grad():
    q = F.rotary_embedding(q, cos[:, None, :], sin[:, None, :])   # tables (T, 1, D) broadcast over heads
    k = F.rotary_embedding(k, cos[:, None, :], sin[:, None, :])   # (B, T, H, D), rotated
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))       # (B, T, H, D) -> (B, H, T, D)
print("cos table", cos.shape, "-> q", q.shape, " k", k.shape, " v", v.shape)
print("a rotation keeps lengths: |q| before/after RoPE at t=20, head 0:",
      np.linalg.norm(attn.q_proj(h).numpy().reshape(B, T, H, D)[0, 20, 0]).round(4),
      np.linalg.norm(q.numpy()[0, 0, 20]).round(4))

# %% [markdown]
# **Attention.** Each head compares every query with every earlier key,
# $\;\text{softmax}\big(q k^\top / \sqrt{D} + M\big)\, v$, where the causal mask $M$ is $-\infty$ above the
# diagonal (a byte may not look at the bytes after it). The heads are concatenated back to width $C$ and
# mixed by $W_o$; the result is **added** to the residual stream.

# %%
with no_grad():
    y = F.scaled_dot_product_attention(q, k, v, causal=True)    # (B, H, T, D)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)                # (B, H, T, D) -> (B, T, H, D) -> (B, T, C)
    x1 = x + attn.o_proj(y)                                     # (B, T, C) @ (C, C)^T, then the residual add
print("attention output", y.shape, "-> after o_proj and the residual", x1.shape)
print(f"|attention branch| / |x| = {np.linalg.norm(attn.o_proj(y).numpy()) / np.linalg.norm(x.numpy()):.2f}")

# %% [markdown]
# **MLP.** SwiGLU: two projections up to the intermediate width $I = 344$, one gated by SiLU,
# multiplied elementwise, projected back down:
# $\;\text{MLP}(h) = W_\text{down}\big(\text{silu}(W_\text{gate} h) \odot W_\text{up} h\big)$.
# Then the second residual add.

# %%
with no_grad():
    h2 = layer.post_attention_layernorm(x1)              # (B, T, C)
    gate = mlp.gate_proj(h2)                             # (B, T, C) @ (I, C)^T -> (B, T, I) = (1, 34, 344)
    up = mlp.up_proj(h2)                                 # (B, T, I)
    a = F.swiglu(gate, up)                               # silu(gate) * up, (B, T, I)
    x2 = x1 + mlp.down_proj(a)                           # (B, T, I) @ (C, I)^T -> (B, T, C), residual add
    by_block = layer(x, cos, sin)                        # the block's own forward, (B, T, C)
print("gate", gate.shape, " up", up.shape, " swiglu", a.shape, " -> x2", x2.shape)
print(f"step by step vs layer(x): max |diff| = {np.abs(x2.numpy() - by_block.numpy()).max():.1e}")

# %% [markdown]
# The step-by-step block and `LlamaDecoderLayer.forward` agree to float32 rounding. (The model
# arranges the heads as (B, T, groups, heads per group, D) so that grouped-query attention can share
# keys without copying; with 4 key/value heads for 4 query heads that is the same computation.)
#
# The rest of the model is three more blocks, a final RMSNorm, and the output head $W_\text{lm}$
# (V, C) that turns each position's vector into 259 logits: scores for the next byte.

# %%
with no_grad():
    hidden = x2
    for blk in list(model.model.layers)[1:]:
        hidden = blk(hidden, cos, sin)                   # (B, T, C) through blocks 1..3
    logits = model.lm_head(model.model.norm(hidden))     # (B, T, C) @ (V, C)^T -> (B, T, V)
    reference = model(ids)                               # (B, T, V), the whole model at once
print("logits", logits.shape, f"  max |diff| vs model(ids) = {np.abs(logits.numpy() - reference.numpy()).max():.1e}")

p_next = F.softmax(reference[:, -1], axis=-1).numpy()[0]  # (V,) next-byte probabilities after the prompt
top = np.argsort(p_next)[::-1][:6]
print(f"after {prompt!r} the model expects:",
      ", ".join(f"{tok.decode([int(i)])!r} {p_next[i]:.2f}" for i in top))

# %% [markdown]
# ## 3. RoPE: positions as rotations
#
# Feature $i$ of the first half of a head and feature $i$ of the second half form a pair, rotated by
# the angle $m\,\theta_i$ at position $m$, with $\theta_i = 10000^{-2i/D}$ for $i = 0 \dots D/2 - 1$.
# The first pairs spin fast (one turn every $2\pi$ positions), the last ones slowly (one turn every
# ~35,000 positions): together they encode position like the hands of a clock.
#
# Because rotating $q$ by $m\theta$ and $k$ by $n\theta$ changes their dot product only through
# $(m - n)\theta$, the attention score depends on the **distance** between two bytes, not on where they
# sit.

# %%
theta = rope_inverse_frequencies(D, config.rope_theta)    # (D/2,) = (16,)
print("theta_i:", theta[:4], "...", theta[-2:])
print("one full turn every 2*pi/theta_i positions:", (2 * np.pi / theta)[[0, 1, 4, 8, 15]].round(0))

rng = np.random.default_rng(0)
q1 = Tensor(rng.standard_normal((1, 1, D)).astype(np.float32))  # one query vector, (B, T, D) = (1, 1, 32)
k1 = Tensor(rng.standard_normal((1, 1, D)).astype(np.float32))  # one key vector, (1, 1, 32)


def score(m, n):
    # q at position m, k at position n: rotate each with the model's tables, then dot
    cq, sq = model.model.rotary(1, offset=m)                  # (1, D) tables for position m
    ck, sk = model.model.rotary(1, offset=n)
    return float((F.rotary_embedding(q1, cq, sq).numpy() * F.rotary_embedding(k1, ck, sk).numpy()).sum())


for m, n in [(5, 2), (40, 37), (120, 117), (5, 4), (5, 0)]:
    print(f"  q at {m:>3}, k at {n:>3} (distance {m - n}): score {score(m, n):+.4f}")

# %%
positions = np.arange(config.max_position_embeddings)
cos_full, _ = model.model.rotary(len(positions))          # (positions, D): [cos(m theta_i), same again]
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
im = left.imshow(cos_full[:, : D // 2].T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1,
                 interpolation="nearest")
left.set_xlabel("position m")
left.set_ylabel("feature pair i")
left.set_title(r"cos(m $\theta_i$): fast pairs on top, slow ones below")
fig.colorbar(im, ax=left)
distances = np.arange(0, 64)
right.plot(distances, [score(70, 70 - d) for d in distances], "o-", ms=3)
right.set_xlabel("distance m - n")
right.set_ylabel("q · k after RoPE")
right.set_title("one (q, k) pair: the score is a function of the distance")
fig.tight_layout()
plt.show()


# %% [markdown]
# ## 4. Attention maps
#
# `F.scaled_dot_product_attention` is fused and does not return its weights, so we recompute them from
# the same rotated $q$, $k$ with `F.softmax` and the causal mask `F.causal_mask`, and check that
# (weights @ v) reproduces the fused op. Hidden states for each block come from running the blocks in
# order.

# %%
def attention_weights(blk, x_in):
    # the (B, H, T, T) attention weights of block `blk` for input x_in (B, T, C)
    hh = blk.input_layernorm(x_in)
    qq = F.rotary_embedding(blk.self_attn.q_proj(hh).reshape(B, T, H, D), cos[:, None, :], sin[:, None, :])
    kk = F.rotary_embedding(blk.self_attn.k_proj(hh).reshape(B, T, H, D), cos[:, None, :], sin[:, None, :])
    vv = blk.self_attn.v_proj(hh).reshape(B, T, H, D).transpose(0, 2, 1, 3)        # (B, H, T, D)
    qq, kk = qq.transpose(0, 2, 1, 3), kk.transpose(0, 2, 1, 3)                   # (B, H, T, D)
    scores = (qq @ kk.transpose(0, 1, 3, 2)) * (1 / np.sqrt(D))                   # (B, H, T, D) @ (B, H, D, T) -> (B, H, T, T)
    w = F.softmax(scores + F.causal_mask(T, T, np, np.float32), axis=-1)          # rows sum to 1
    fused = F.scaled_dot_product_attention(qq, kk, vv, causal=True)               # (B, H, T, D)
    return w.numpy(), float(np.abs((w @ vv).numpy() - fused.numpy()).max())


maps = []
with no_grad():
    hidden = x
    for blk in model.model.layers:
        w, err = attention_weights(blk, hidden)
        maps.append(w[0])                                # (H, T, T)
        hidden = blk(hidden, cos, sin)
maps = np.stack(maps)                                    # (layers, H, T, T)
print("attention weights", maps.shape, f"; weights @ v vs the fused op: max |diff| {err:.1e}")

# %%
chars = [c if c != " " else "␣" for c in prompt]
show = 1                                                 # which layer to draw large
fig, axes = plt.subplots(1, H, figsize=(16, 4.4))
for head, ax in enumerate(axes):
    ax.imshow(maps[show, head], cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(T), chars, fontsize=6)
    ax.set_yticks(range(T), chars, fontsize=6)
    ax.set_title(f"layer {show}, head {head}")
    ax.set_xlabel("key (attended to)")
axes[0].set_ylabel("query (attending)")
fig.tight_layout()
plt.show()

# %% [markdown]
# Each row is one byte's attention over the bytes before it (the upper triangle is the causal mask).
# Heads differ: some look at the previous one or two bytes (a bright sub-diagonal), useful for spelling
# out a word; others look further back, to the start of the current word or the first byte. A summary
# over all 16 heads, the average distance each head looks back, $\sum_j w_{tj}\,(t - j)$ averaged over
# positions $t$:

# %%
dist = np.arange(T)[:, None] - np.arange(T)[None, :]       # (T, T): t - j
lookback = (maps * dist).sum(-1).mean(-1)                      # (layers, H): mean bytes looked back
prev_byte = np.diagonal(maps, offset=-1, axis1=-2, axis2=-1).mean(-1)  # (layers, H): weight on byte t-1
print("mean distance looked back (bytes), rows = layers, columns = heads:")
print(lookback.round(1))
print("mean weight on the previous byte:")
print(prev_byte.round(2))
fig, axes = plt.subplots(config.num_hidden_layers, H, figsize=(10, 10))
for l in range(config.num_hidden_layers):
    for head in range(H):
        ax = axes[l, head]
        ax.imshow(maps[l, head], cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"L{l} H{head}: {lookback[l, head]:.1f} back", fontsize=8)
fig.suptitle("all heads (rows: layers 0-3)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Decoding: greedy, temperature, top-k
#
# The model gives a distribution over the next byte; a decoding rule picks one, appends it, and asks
# again (the KV cache in `model.generate` keeps earlier keys and values so each step costs one new
# position).
#
# - **greedy**: always the most likely byte; deterministic, and a small model soon loops;
# - **temperature** $\tau$: sample from $\text{softmax}(z/\tau)$; $\tau < 1$ sharpens, $\tau > 1$ flattens;
# - **top-k**: sample only among the $k$ most likely bytes (Fan et al. 2018), cutting the long tail.
#
# First the distributions themselves, for the first byte of the word after "The function returns a
# list of the ": `sample_next_token` (what `generate` calls) drawn 4000 times, next to
# $\text{softmax}(z/\tau)$.

# %%
with no_grad():
    z = model(np.array([tok.encode(prompt + " ")])).numpy()[0, -1].astype(np.float64)  # (V,) next-byte logits
n_draws = 4000
settings = {"τ = 0.5": dict(temperature=0.5), "τ = 1": dict(temperature=1.0),
            "τ = 1.5": dict(temperature=1.5), "τ = 1, top-k = 5": dict(temperature=1.0, top_k=5)}
draw_rng = np.random.default_rng(0)
freq = {}
for name, kw in settings.items():
    draws = sample_next_token(np.tile(z, (n_draws, 1)), do_sample=True, rng=draw_rng, **kw)  # (n_draws,)
    freq[name] = np.bincount(draws, minlength=z.size) / n_draws                               # (V,)
order = np.argsort(z)[::-1][:12]
labels = [repr(tok.decode([int(i)])) for i in order]
fig, ax = plt.subplots(figsize=(12, 3.6))
width = 0.2
for j, (name, f) in enumerate(freq.items()):
    ax.bar(np.arange(len(order)) + (j - 1.5) * width, f[order], width, label=name)
    if "top" not in name:
        p = F.softmax(Tensor(z / settings[name]["temperature"]), axis=-1).numpy()
        ax.plot(np.arange(len(order)) + (j - 1.5) * width, p[order], "k.", ms=4)
ax.set_xticks(range(len(order)), labels)
ax.set_ylabel("frequency in 4000 draws")
ax.set_title("the next byte: sampled frequencies (bars) and softmax(z/τ) (dots)")
ax.legend()
fig.tight_layout()
plt.show()
print("mass outside the 12 most likely bytes:", {k: round(float(1 - f[order].sum()), 3) for k, f in freq.items()})

# %%
n_new = 60 if FAST else 160
start = np.array([tok.encode("The ")])                       # (1, 4)
runs = {"greedy": dict(),
        "temperature 0.5": dict(do_sample=True, temperature=0.5, seed=0),
        "temperature 1.0": dict(do_sample=True, temperature=1.0, seed=0),
        "temperature 1.5": dict(do_sample=True, temperature=1.5, seed=0),
        "temperature 1.0, top-k 5": dict(do_sample=True, temperature=1.0, top_k=5, seed=0)}
for name, kw in runs.items():
    out = model.generate(start, max_new_tokens=n_new, **kw)   # (1, 4 + n_new) host int64
    text = tok.decode(out[0].tolist())
    print(f"--- {name}\n{text}\n")

# %% [markdown]
# Greedy decoding repeats its most likely phrase. A low temperature stays close to it; $\tau = 1$ samples
# the model's own distribution and reads like the docstrings it was trained on; $\tau = 1.5$ gives the
# tail too much weight and produces non-words; top-k removes the tail and keeps $\tau = 1$'s variety.
#
# ## 6. Where the parameters are
#
# `memory.count_parameters(config)` computes every count from the shapes alone (it is what the article
# check uses for Llama-7B and 70B); `model.num_parameters()` sums the arrays the model actually holds.
# They must agree.

# %%
counts = memory.count_parameters(config)
held = {name: p.size for name, p in model.named_parameters()}
print(f"memory.count_parameters(config)['total'] = {counts['total']:>9,}")
print(f"model.num_parameters()                   = {model.num_parameters():>9,}")
print()
layer0 = {n.split('layers.0.')[1].removesuffix('.weight'): s for n, s in held.items() if '.layers.0.' in n}
print(f"{'one decoder layer':<34}{'held':>9}{'formula':>10}")
for name, size in layer0.items():
    key = name.split(".")[-1]
    print(f"  {name:<32}{size:>9,}{counts['layer'][key]:>10,}")
print(f"  {'total':<32}{sum(layer0.values()):>9,}{counts['layer']['total']:>10,}")
print()
for part, held_n in [("embed_tokens", held["model.embed_tokens.weight"]), ("layers", sum(
        s for n, s in held.items() if ".layers." in n)), ("norm", held["model.norm.weight"]),
        ("lm_head", held["lm_head.weight"])]:
    print(f"{part:<34}{held_n:>9,}{counts[part]:>10,}")


# %%
def shares(cfg):
    c = memory.count_parameters(cfg)
    n = cfg.num_hidden_layers
    return {"attention (q,k,v,o)": n * c["layer"]["self_attn"], "MLP (gate,up,down)": n * c["layer"]["mlp"],
            "embeddings + lm_head": c["embed_tokens"] + c["lm_head"],
            "norms": n * (c["layer"]["input_layernorm"] + c["layer"]["post_attention_layernorm"]) + c["norm"]}


models = {"minilora base (0.86 M)": shares(config), "Llama-7B (6.7 B)": shares(PRESETS["llama-7b"])}
fig, ax = plt.subplots(figsize=(9, 2.6))
for row, (name, s) in enumerate(models.items()):
    total, left = sum(s.values()), 0.0
    for j, (part, n) in enumerate(s.items()):
        ax.barh(row, n / total, left=left, color=f"C{j}", label=part if row == 0 else None)
        if n / total > 0.04:
            ax.text(left + n / total / 2, row, f"{n / total:.0%}", ha="center", va="center", color="white")
        left += n / total
ax.set_yticks(range(len(models)), list(models))
ax.set_xlim(0, 1)
ax.set_xlabel("share of all parameters")
ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35))
fig.tight_layout()
plt.show()
for name, s in models.items():
    total = sum(s.values())
    print(f"{name}: " + ", ".join(f"{k} {v / total:.1%}" for k, v in s.items()))

# %% [markdown]
# The proportions are close: in both, the MLP holds about two thirds of the weights (62% here, 64% in
# Llama-7B) and attention about a third (31%, 32%): the same $C \times C$ and $C \times I$ shapes per
# layer. Only the embeddings weigh more here (8% against 4%: a 259-row table is small, but so is
# everything else). That is why LoRA's savings
# carry over: an adapter on $W_q$ (128×128 here, 4096×4096 in Llama-7B) at rank $r$ adds
# $r\,(128 + 128)$ parameters next to $128^2$, the same ratio $2r/d$ at every scale.
#
# ## What to take away
#
# - A block is RMSNorm → q/k/v → RoPE → causal attention → $W_o$ → residual, then RMSNorm → SwiGLU
#   MLP → residual; every step keeps the shape (B, T, C) except inside attention (B, H, T, D) and the
#   MLP (B, T, I).
# - RoPE rotates queries and keys by position-dependent angles, so scores depend on distance only.
# - Heads specialise: some attend to the previous byte, others further back.
# - Decoding is a choice: greedy loops, temperature trades coherence for variety, top-k cuts the tail.
# - The Linear layers hold almost all parameters; they are what LoRA adapts (notebooks 03 to 05).
