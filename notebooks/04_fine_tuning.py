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
# # 04 · Fine-tuning: LoRA against full fine-tuning
#
# > Instead of updating all the weights, LoRA freezes the pretrained model and trains small low-rank
# > matrices. — *What is LoRA?*
#
# Same base model, same instruction data, same batches, same number of steps; two ways to train:
#
# - **full fine-tuning**: every one of the 857,984 parameters gets a gradient and AdamW state;
# - **LoRA**: $W_0$ frozen, rank-8 factors $A$, $B$ on $W_q, W_k, W_v, W_o$ (what `minilora demo` uses).
#
# We measure what the article talks about: the **loss curves**, **held-out exact-match accuracy** on
# instructions whose words and names never appear in training, the **trainable parameters**, the
# **step time** and the **memory** of a training step, and **forgetting**: how much worse each
# fine-tuned model gets at the text it was pretrained on.
#
# Everything runs on the CPU with the library's own recipe (`minilora.commands.finetune.lora_finetune`, the
# function behind `minilora demo`); the full fine-tune uses the same loop (`minilora.train.train`),
# optimizer, schedule and batches.

# %%
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest (set before NumPy loads)

import gc
import time
import tracemalloc

import matplotlib.pyplot as plt
import numpy as np

import minilora
from minilora import memory
from minilora.data import (ByteTokenizer, collate, iterate_batches, make_instruction_dataset,
                           pretraining_data, random_batches)
from minilora.commands.finetune import DEFAULT_TARGETS, exact_match_accuracy, lora_finetune, per_family_accuracy
from minilora.lora import LoraConfig, get_peft_model
from minilora.models import load_base_model
from minilora.optim import AdamW, LambdaLR, WarmupCosine
from minilora.train import evaluate, train

FAST = os.environ.get("MINILORA_FAST") == "1"   # fewer steps, smaller eval sets for quick CI runs
STEPS = 40 if FAST else 150                     # optimizer steps for each method
BATCH = 8                                       # instructions per step
N_TEST = 35 if FAST else 70                     # held-out instructions scored by exact match
LR = {"LoRA": 3e-3, "full": 3e-4}               # each method's peak learning rate (see below)
SEED = 0
minilora.manual_seed(SEED)
tok = ByteTokenizer()

train_set, test_set = make_instruction_dataset(2000, N_TEST, seed=SEED)
test_batches = [collate(test_set[i:i + 64], tok, 128) for i in range(0, len(test_set), 64)]
_, pretrain_val = pretraining_data(tok)                          # held-out stdlib docstrings
text_batches = [random_batches(pretrain_val, 16, 128, np.random.default_rng(SEED + i))
                for i in range(2 if FAST else 6)]                 # fixed (16, 128) windows
print(f"{len(train_set)} training instructions, {len(test_set)} held out; e.g.")
for ex in test_set[:3]:
    print(f"   {ex['instruction']} [{ex['input']}] -> {ex['output']!r}")
print(f"pretraining validation text: {len(pretrain_val):,} bytes; scored on "
      f"{len(text_batches)} x {text_batches[0][0].shape} windows")

# %% [markdown]
# ## 1. The base model before fine-tuning
#
# Three numbers for the pretrained model: exact-match accuracy on the held-out instructions (greedy
# answers, `finetune.exact_match_accuracy`), the loss on the held-out instructions' answers, and the
# loss on held-out pretraining text (the docstrings it was trained to write; its pretraining also
# mixed in synthetic copy drills, but the held-out text is docstrings only).

# %%
base = load_base_model()
results = {}
acc, answers = exact_match_accuracy(base, test_set, tok)
results["base"] = {"accuracy": acc, "instruction loss": evaluate(base, test_batches),
                   "pretraining-text loss": evaluate(base, text_batches)}
print({k: round(v, 4) for k, v in results["base"].items()})
for ex, a in list(zip(test_set, answers))[:3]:
    print(f"   {ex['instruction']} [{ex['input']}] -> {a!r}  (expected {ex['output']!r})")

# %% [markdown]
# ## 2. Two fine-tunes, same steps
#
# Both use AdamW (no weight decay), linear warm-up for 20 steps then cosine decay, gradient clipping
# at 1.0, batches of 8 drawn in the same seeded order, prompt tokens masked out of the loss. The only
# differences are **which parameters train** and the **learning rate**. LoRA is usually run with a
# learning rate about ten times higher than full fine-tuning (its factors start at $B = 0$ and every
# step moves a product $BA$ of small matrices). LoRA gets the demo's $3\cdot10^{-3}$ and full
# fine-tuning ten times less, $3\cdot10^{-4}$: at these rates the two reach about the same held-out
# loss in this many steps, so their forgetting can be compared at equal learning.
#
# `lora_finetune` is the demo's recipe. The library has no full fine-tuning function (LoRA is the point
# of it), so the full fine-tune below repeats that recipe's few lines with every parameter trainable.

# %%
lora_config = LoraConfig(r=8, lora_alpha=16, target_modules=DEFAULT_TARGETS)   # the demo's adapter
t0 = time.perf_counter()
lora_model, lora_hist = lora_finetune(load_base_model(), lora_config, train_set, tok, steps=STEPS,
                                      lr=LR["LoRA"], batch_size=BATCH, seed=SEED,
                                      eval_examples=test_set, eval_every=STEPS // 6, progress=False)
wall = {"LoRA": time.perf_counter() - t0}
lora_model.print_trainable_parameters()
print(f"LoRA: {STEPS} steps in {wall['LoRA']:.1f} s")


# %%
def full_finetune(model, steps, lr, batch_size, seed, warmup=20, eval_every=50):
    # lora_finetune's recipe with every parameter trainable: AdamW, warm-up + cosine, clip 1.0
    minilora.manual_seed(seed)
    optimizer = AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = LambdaLR(optimizer, WarmupCosine(min(warmup, steps - 1), steps))
    rng = np.random.default_rng(seed)

    def endless():
        while True:  # one shuffled epoch after another, the same order as lora_finetune's
            yield from iterate_batches(train_set, tok, batch_size, rng=rng, max_len=128)

    history = train(model, endless(), optimizer, steps, eval_fn=lambda m: evaluate(m, test_batches),
                    eval_every=eval_every, scheduler=scheduler, clip=1.0, progress=False, seed=seed)
    return model.eval(), history


t0 = time.perf_counter()
full_model, full_hist = full_finetune(load_base_model(), STEPS, LR["full"], BATCH, SEED,
                                      eval_every=STEPS // 6)
wall["full"] = time.perf_counter() - t0
print(f"full fine-tuning: {full_model.num_parameters(trainable_only=True):,} trainable parameters; "
      f"{STEPS} steps in {wall['full']:.1f} s")


# %%
def smooth(values, k=15):
    return np.convolve(values, np.ones(k) / k, mode="valid")   # running mean over k steps


fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
for name, hist, color in (("LoRA r=8", lora_hist, "C0"), ("full fine-tuning", full_hist, "C1")):
    steps = np.array([h["step"] for h in hist])
    losses = np.array([h["loss"] for h in hist])
    left.plot(steps, losses, color=color, alpha=0.2, lw=0.8)
    left.plot(steps[14:], smooth(losses), color=color, lw=2, label=f"{name} (mean of 15 steps)")
    ev = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]
    right.plot(*zip(*([(0, results["base"]["instruction loss"])] + ev)), "o-", color=color, label=name)
left.set_xlabel("step")
left.set_ylabel("training loss (nats / answer byte)")
left.set_title("training loss")
left.legend()
right.set_xlabel("step")
right.set_ylabel("held-out loss (nats / answer byte)")
right.set_title("loss on the held-out instructions")
right.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Held-out accuracy and forgetting
#
# Accuracy is what a user sees: greedy answers to the held-out instructions, right or wrong.
# **Forgetting** is measured on the pretraining validation text, windows of stdlib docstrings that the
# base model never trained on: a rise in that loss means the fine-tune damaged what pretraining
# taught.

# %%
answers_by = {}
for name, model in (("LoRA", lora_model), ("full", full_model)):
    acc, answers_by[name] = exact_match_accuracy(model, test_set, tok)
    results[name] = {"accuracy": acc, "instruction loss": evaluate(model, test_batches),
                     "pretraining-text loss": evaluate(model, text_batches)}

print(f"{'':<8}{'accuracy':>10}{'instruction loss':>18}{'pretraining-text loss':>23}{'forgetting':>12}")
for name, r in results.items():
    forget = r["pretraining-text loss"] - results["base"]["pretraining-text loss"]
    print(f"{name:<8}{r['accuracy']:>10.1%}{r['instruction loss']:>18.3f}"
          f"{r['pretraining-text loss']:>23.3f}{forget:>+12.3f}")
print()
fam = {name: per_family_accuracy(test_set, answers_by[name]) for name in answers_by}
print(f"{'task':<14}" + "".join(f"{name:>8}" for name in fam))
for task in fam["LoRA"]:
    print(f"{task:<14}" + "".join(f"{fam[name][task]:>8.0%}" for name in fam))

# %%
for ex, a_lora, a_full in list(zip(test_set, answers_by["LoRA"], answers_by["full"]))[:8]:
    print(f"{ex['instruction'][:28]:<28} [{ex['input']:>5}]  expected {ex['output']!r:<14} "
          f"LoRA {a_lora!r:<14} full {a_full!r}")

# %% [markdown]
# ## 4. What each step costs: trainable parameters, time, memory
#
# **Parameters.** `memory.lora_parameters` predicts the adapter's size from the shapes alone
# ($r\,(d_\text{in} + d_\text{out})$ per adapted matrix); the model's own count must agree.

# %%
config = base.config
predicted = memory.lora_parameters(config, r=8, target_modules=DEFAULT_TARGETS)
trainable, total = lora_model.get_nb_trainable_parameters()
n_full = full_model.num_parameters(trainable_only=True)
print(f"LoRA trainable: {trainable:,} (memory.lora_parameters predicts {predicted:,}) "
      f"= {trainable / n_full:.2%} of the model")
print(f"full trainable: {n_full:,} (memory.count_parameters: {memory.count_parameters(config)['total']:,})")

# %% [markdown]
# **Step time.** A fresh copy of each model trains on one fixed batch; `train`'s history records tokens
# per second, so the time of a step is tokens / (tokens per second). The two methods take turns step
# by step, so that other work on the machine slows both alike, and the first two steps of each
# (which allocate AdamW's state) are left out of the median.
#
# **Memory.** `tracemalloc` counts every byte NumPy allocates. It starts after the model is loaded, so
# its peak during a (steady-state) step is what training *adds* to the weights: gradients, AdamW's
# two moments, and the activations kept for the backward pass. `memory.memory_breakdown(...,
# weight_bytes=4)` predicts the first two in float32 (4 B of gradient and 8 B of AdamW state per
# trainable parameter); the AdamW state the optimizer actually holds is summed next to it. Activations
# are left out of the prediction on purpose: they depend on the batch, not on the model.

# %%
fixed = collate(train_set[:BATCH], tok, 128)                  # one batch, (8, T)
n_tok = fixed["input_ids"].size
n_time = 6 if FAST else 16


def fresh(method):
    model = load_base_model()
    return get_peft_model(model, lora_config) if method == "LoRA" else model


def adamw_for(model):
    return AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)


def one_step(model, opt):
    # one training step on the fixed batch; its time from train()'s tokens/s
    hist = train(model, lambda step: fixed, opt, 1, clip=1.0, progress=False)
    return n_tok / hist[0]["tokens_per_s"]


# Step time: the two methods take turns, so that a busy machine slows both alike.
models_ = {m: fresh(m) for m in ("LoRA", "full")}
setups = {m: (model, adamw_for(model)) for m, model in models_.items()}
times = {m: [] for m in setups}
for i in range(n_time + 2):
    for m in (("LoRA", "full") if i % 2 else ("full", "LoRA")):
        t = one_step(*setups[m])
        if i >= 2:                                              # the first steps allocate AdamW state
            times[m].append(t)


def measured_memory(method):
    # bytes that a training step allocates on top of the loaded model (tracemalloc sees NumPy)
    model = fresh(method)
    gc.collect()
    tracemalloc.start()
    opt = adamw_for(model)
    one_step(model, opt)                                        # allocates AdamW's state
    gc.collect()
    tracemalloc.reset_peak()
    one_step(model, opt)                                        # a steady-state step
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    state = sum(buf.nbytes for st in opt.state.values() for k, buf in st.items() if k != "step")
    return peak, state


cost = {}
for method in ("LoRA", "full"):
    peak, state = measured_memory(method)
    mb = (memory.memory_breakdown(config, "lora", r=8, target_modules=DEFAULT_TARGETS, weight_bytes=4)
          if method == "LoRA" else memory.memory_breakdown(config, "full", weight_bytes=4))
    cost[method] = {"step": float(np.median(times[method])), "peak": peak, "state": state,
                    "pred_state": mb.optimizer, "pred_grads": mb.gradients}

MiB = 2 ** 20
print(f"one step on a ({BATCH}, {fixed['input_ids'].shape[1]}) batch of {n_tok} tokens; "
      f"the weights themselves take {n_full * 4 / MiB:.2f} MiB")
print(f"{'':<6}{'median step':>12}{'gradients':>22}{'AdamW state':>26}{'measured peak':>16}")
print(f"{'':<6}{'':>12}{'(predicted)':>22}{'(predicted / held)':>26}{'above weights':>16}")
for method, c in cost.items():
    print(f"{method:<6}{c['step'] * 1e3:>9.0f} ms{c['pred_grads'] / MiB:>18.2f} MiB"
          f"{c['pred_state'] / MiB:>14.2f} /{c['state'] / MiB:>6.2f} MiB{c['peak'] / MiB:>12.2f} MiB")
act = {m: (c["peak"] - c["state"] - c["pred_grads"]) / MiB for m, c in cost.items()}
print("peak - AdamW state - gradients (mostly activations kept for backward): "
      + ", ".join(f"{m} {v:.1f} MiB" for m, v in act.items()))

# %%
fig, axes = plt.subplots(1, 5, figsize=(17, 3.4))
names = ["LoRA", "full"]
colors = ["C0", "C1"]
panels = [("trainable parameters", [trainable, n_full], "{:,.0f}"),
          ("median step time (ms)", [cost[m]["step"] * 1e3 for m in names], "{:.0f}"),
          ("peak training memory\nabove the weights (MiB)", [cost[m]["peak"] / MiB for m in names], "{:.1f}"),
          ("held-out accuracy", [results[m]["accuracy"] for m in names], "{:.0%}"),
          ("forgetting: rise of the\npretraining-text loss (nats)",
           [results[m]["pretraining-text loss"] - results["base"]["pretraining-text loss"] for m in names],
           "{:+.2f}")]
for ax, (title, vals, fmt) in zip(axes, panels):
    ax.bar(names, vals, color=colors)
    for i, v in enumerate(vals):
        ax.text(i, v, fmt.format(v), ha="center", va="bottom")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(vals) * 1.2)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Is the forgetting an artefact of the learning rates?
#
# The two learning rates above were picked so that both methods reach about the same held-out loss.
# To see whether the forgetting gap is an artefact of that pick, each method trains again, from the
# same base, same batches and same steps, at a learning rate three times lower and three times higher.

# %%
sweep = {("LoRA", LR["LoRA"]): lora_model, ("full", LR["full"]): full_model}   # the two runs above
for method, factor in (("LoRA", 1 / 3), ("LoRA", 10 / 3), ("full", 1 / 3), ("full", 10 / 3)):
    lr = round(LR[method] * factor, 6)                         # 1e-3 and 1e-2 for LoRA, 1e-4 and 1e-3 for full
    if method == "LoRA":
        sweep[method, lr] = lora_finetune(load_base_model(), lora_config, train_set, tok, steps=STEPS, lr=lr,
                                          batch_size=BATCH, seed=SEED, progress=False)[0]
    else:
        sweep[method, lr] = full_finetune(load_base_model(), STEPS, lr, BATCH, SEED, eval_every=STEPS)[0]
swept = {}
for (method, lr), model in sorted(sweep.items()):
    swept[method, lr] = {"accuracy": exact_match_accuracy(model, test_set, tok)[0],
                         "instruction loss": evaluate(model, test_batches),
                         "pretraining-text loss": evaluate(model, text_batches)}
print(f"{'method':<10}{'learning rate':>14}{'instruction loss':>18}{'accuracy':>10}{'pretraining-text loss':>23}")
for (method, lr), r in swept.items():
    print(f"{method:<10}{lr:>14g}{r['instruction loss']:>18.3f}{r['accuracy']:>10.1%}"
          f"{r['pretraining-text loss']:>23.3f}")

# %% [markdown]
# ## What the numbers say
#
# The cell below writes this section from the values computed above, so its figures are this run's.

# %%
from IPython.display import Markdown

pct = lambda x: f"{100 * x:.0f}%"                             # noqa: E731
base_text = results["base"]["pretraining-text loss"]
forget = {m: results[m]["pretraining-text loss"] - base_text for m in ("LoRA", "full")}
hits = {m: round(results[m]["accuracy"] * len(test_set)) for m in ("LoRA", "full")}
COPYING = ("repeat", "first_letter", "length")                 # read the unseen word off the prompt
TRANSFORMING = ("reverse", "uppercase", "add")                 # change it or compute with it
copy_acc = [fam[m][t] for m in fam for t in COPYING]
other_acc = [fam[m][t] for m in fam for t in TRANSFORMING + ("pirate",)]
assert min(copy_acc) > max(other_acc), "the per-task split below no longer holds: reword it"
peak_cut = 1 - cost["LoRA"]["peak"] / cost["full"]["peak"]
time_cut = 1 - cost["LoRA"]["step"] / cost["full"]["step"]
weights_7b = memory.count_parameters("llama-7b")["total"] * 2 / memory.GB
same_loss_gap = (swept["LoRA", LR["LoRA"]]["pretraining-text loss"]
                 - swept["full", LR["full"]]["pretraining-text loss"])
pairs = []                                                     # each LoRA run, the full run nearest in loss
for (m, lr), r in swept.items():
    if m == "LoRA":
        near = min((k for k in swept if k[0] == "full"),
                   key=lambda k: abs(swept[k]["instruction loss"] - r["instruction loss"]))
        pairs.append((lr, near[1], r["pretraining-text loss"] > swept[near]["pretraining-text loss"]))
Markdown(f"""
This run: {STEPS} steps, one seed.

- **Trainable parameters and optimizer state**: LoRA trains {trainable:,} numbers,
  {trainable / n_full:.2%} of the base model's {n_full:,} parameters (the trainable% that
  `print_trainable_parameters` prints above, {100 * trainable / total:.4f}, is PEFT's: it divides by
  all {total:,} parameters of the adapted model, the adapter's own included; `minilora demo` prints
  the same), and its AdamW state is {cost['full']['state'] / cost['LoRA']['state']:.0f} times smaller,
  exactly as `memory` predicts (8 B per trainable parameter, and the optimizer holds exactly that).
- **Peak memory**: only {pct(peak_cut)} lower with LoRA. For a model this small the activations kept
  for the backward pass ({act['full']:.0f} MiB for one batch of {BATCH},
  {act['full'] / (n_full * 4 / MiB):.0f} times the weights) dominate, and LoRA does not shrink them:
  the gradient still flows through every frozen layer. At 7B parameters the proportions flip: 16-bit
  weights alone are {weights_7b:.1f} GB, and full fine-tuning's gradients and AdamW state (notebook 00)
  are what LoRA removes.
- **Step time**: a LoRA step is faster, but by a fraction ({pct(time_cut)} in this run; it varies from
  run to run on a busy machine), not by the ratio of trainable parameters. A LoRA step still runs the
  whole forward and backward pass through the frozen model; it skips only the weight gradients
  $G^\\top X$ of the frozen matrices and their AdamW update.
- **Quality**: at these learning rates both reach about the same held-out loss
  ({results['LoRA']['instruction loss']:.2f} and {results['full']['instruction loss']:.2f}) and about
  the same exact-match accuracy ({results['LoRA']['accuracy']:.1%} and {results['full']['accuracy']:.1%}:
  {hits['LoRA']} and {hits['full']} answers right of {len(test_set)}). What they learn is the tasks that
  read the unseen word off the prompt ({', '.join(COPYING)}), right {pct(min(copy_acc))} to
  {pct(max(copy_acc))} of the time. The tasks that **transform** it or compute ({', '.join(TRANSFORMING)})
  stay at {pct(min(fam[m][t] for m in fam for t in TRANSFORMING))} to
  {pct(max(fam[m][t] for m in fam for t in TRANSFORMING))}, and so does the pirate greeting
  ({pct(fam['LoRA']['pirate'])} and {pct(fam['full']['pirate'])}): the "Ahoy, ...!" format is learned,
  but the held-out name is not reliably copied into it. Copying from the context is what pretraining
  made possible: the base saw synthetic copy drills. `minilora demo` trains longer.
- **Forgetting**: here LoRA forgets {'*more*' if forget['LoRA'] > forget['full'] else '*less*'} than full
  fine-tuning: its loss on the pretraining text rises {forget['LoRA'] / forget['full']:.1f} times as much.
  Large models often show the opposite (Biderman et al., 2024, "LoRA Learns Less and Forgets Less").
  The sweep of section 5 checks the learning rates: at about the same instruction loss
  ({LR['LoRA']:g} against {LR['full']:g}) LoRA lost {same_loss_gap:.1f} nats more on the pretraining
  text. Pairing each LoRA run with the full fine-tune whose held-out instruction loss is nearest
  ({'; '.join(f'{a:g} with {b:g}' for a, b, _ in pairs)}), LoRA's pretraining-text loss ended higher
  in {sum(w for *_, w in pairs)} of the {len(pairs)} pairs: at equal learning, LoRA forgot
  {'more' if all(w for *_, w in pairs) else 'more in some pairs only'} on this tiny model. A plausible reason, not tested here: LoRA
  puts the whole change into the four attention projections (at scaling $\\alpha/r = {lora_config.lora_alpha / lora_config.r:g}$),
  which every prediction goes through, while full fine-tuning can spread a smaller change over the MLP,
  the embeddings and the output head. One task, one seed, one {n_full / 1e6:.1f}M-parameter model: a
  reason to measure forgetting on your own model rather than assume it.
""")
