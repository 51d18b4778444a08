"""Direct Preference Optimization on a LoRA adapter (Rafailov et al. 2023, "Direct Preference
Optimization: Your Language Model is Secretly a Reward Model").

DPO fits a policy π_θ to pairs (x, y_w, y_l), answer y_w preferred to y_l, without a reward model
and without sampling. The paper's equation 7:

    L_DPO(π_θ; π_ref) = −E[ log σ( β·log(π_θ(y_w|x) / π_ref(y_w|x)) − β·log(π_θ(y_l|x) / π_ref(y_l|x)) ) ]

π_ref is the frozen model training starts from, β (0.1 here, TRL's default) how far π_θ may move
from it; β·log(π_θ(y|x) / π_ref(y|x)) is the "implicit reward" of answer y (section 5), so the
loss is a logistic loss on the margin between the two answers' rewards. ``dpo_loss`` writes that
line with the argument names of TRL's ``DPOTrainer.dpo_loss`` and its ``"sigmoid"`` loss, conservative
DPO's label smoothing ε included (the preference label trusted with probability 1 − ε):

    loss = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h),   h = (π_c − ρ_c) − (π_r − ρ_r)

where π_c, π_r are the policy's and ρ_c, ρ_r the reference's summed log-probabilities of the chosen
and rejected answers (``sequence_logps``: the labelled tokens only, -100 skipped, as TRL's
concatenated forward sums them).

**Why LoRA makes DPO cheap.** DPO needs two models, the policy and the reference. With an adapter
the reference is the same model with the adapter switched off: π_ref = π_θ at B = 0, so
``reference_logps`` runs the one model under ``with peft_model.disable_adapter():`` and
``no_grad()``. There is no second copy of the base's weights in memory and no optimizer state beyond
the adapter's, and at initialisation (B = 0) the policy equals the
reference, so the loss starts at exactly log 2 and every reward at 0 (tests/test_dpo.py checks this,
that the reference log-probs equal a separate base model's, and that no base weight gets a gradient).

``train_dpo`` is the loop: ``train.train`` (the same step, clipping, fault checks, progress bar and
seeding as supervised fine-tuning) driving ``DPOObjective``, whose forward scores chosen and rejected
rows of one batch together (``data.preferences.collate_preferences``) and returns the mean DPO loss;
every ``eval_every`` steps and at the end it measures, on held-out pairs, the mean reward margin
(chosen reward − rejected reward) and the preference accuracy (the share of pairs whose chosen answer
has the larger reward), TRL's ``rewards/margins`` and ``rewards/accuracies``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import backend
from . import functional as F
from .data.batching import IGNORE_INDEX
from .data.preferences import collate_preferences
from .nn import Module
from .optim import AdamW, LambdaLR, WarmupCosine
from .tensor import Tensor, no_grad
from .train import train


def log_sigmoid(x: Tensor) -> Tensor:
    """log σ(x) = min(x, 0) − log(1 + exp(−|x|)), computed without overflow for any x.

    |x| is x·sign(x) (sign a constant: d|x|/dx = sign(x)) and min(x, 0) = (x − |x|) / 2, so exp only
    ever sees −|x| ≤ 0: the naive −log(1 + exp(−x)) gives −inf (and NaN gradients) once exp(−x)
    overflows, for x below about −88.7 in float32.
    """
    abs_x = x * backend.get_xp(x.data).sign(x.data)
    return (x - abs_x) * 0.5 - ((-abs_x).exp() + 1.0).log()


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta: float = 0.1, label_smoothing: float = 0.0):
    """(losses, chosen_rewards, rejected_rewards), one of each per pair: TRL's ``DPOTrainer.dpo_loss``
    with ``loss_type="sigmoid"``, the paper's equation 7 (module docstring).

    Arguments are (B,) Tensors (or arrays) of summed log-probabilities of each pair's chosen and
    rejected answers under the policy and under the reference. The rewards are β·(π − ρ), detached
    (TRL's ``chosen_rewards`` / ``rejected_rewards``); the losses keep the graph to the policy's.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (TRL's default is 0.1), got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] (conservative DPO), got {label_smoothing}")
    pi_c, pi_r, ref_c, ref_r = (t if isinstance(t, Tensor) else Tensor(t) for t in (
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps))
    ref_c, ref_r = ref_c.detach(), ref_r.detach()        # the reference is a constant: no gradient
    chosen_logratios = pi_c - ref_c                      # log π_θ(y_w|x) / π_ref(y_w|x)   (B,)
    rejected_logratios = pi_r - ref_r                    # log π_θ(y_l|x) / π_ref(y_l|x)   (B,)
    h = chosen_logratios - rejected_logratios            # (B,)
    losses = -log_sigmoid(h * beta) * (1.0 - label_smoothing) - log_sigmoid(-h * beta) * label_smoothing
    chosen_rewards = (chosen_logratios * beta).detach()
    rejected_rewards = (rejected_logratios * beta).detach()
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(model, input_ids, labels, attention_mask=None) -> Tensor:
    """Σ_t log p(labels[t] | tokens < t) for each row: the answer's log-probability, (B,).

    Labels are aligned with input_ids (Hugging Face's convention): position t's logits score
    ``labels[t + 1]``; positions labelled -100 (prompt, padding) count for nothing. TRL's
    ``get_batch_logps`` / concatenated forward.
    """
    labels = labels.data if isinstance(labels, Tensor) else backend.to_device(np.asarray(labels))
    xpmod = backend.get_xp(labels)
    logits = model(input_ids, attention_mask=attention_mask)          # (B, T, V)
    B, T, _ = logits.shape
    logp = F.log_softmax(logits[:, :-1])                                # (B, T-1, V): token t+1 | ≤ t
    targets = labels[:, 1:]                                             # (B, T-1)
    scored = targets != IGNORE_INDEX                                    # (B, T-1)
    rows = xpmod.arange(B)[:, None]                                     # (B, 1)
    cols = xpmod.arange(T - 1)[None, :]                                 # (1, T-1)
    picked = logp[rows, cols, xpmod.where(scored, targets, 0)]          # (B, T-1) log p(label)
    return (picked * scored.astype(picked.data.dtype)).sum(axis=1)     # (B,)


def reference_logps(peft_model, input_ids, labels, attention_mask=None) -> Tensor:
    """``sequence_logps`` of the reference model: the same ``peft_model`` with its adapters disabled,
    under ``no_grad()`` (no graph, no second copy of the weights), as a constant Tensor."""
    with no_grad(), peft_model.disable_adapter():
        return sequence_logps(peft_model, input_ids, labels, attention_mask).detach()


@dataclass
class DPOOutput:
    """What ``DPOObjective`` returns: the batch's mean DPO loss (``loss``, what the loop trains on)
    and each pair's detached chosen / rejected rewards, (B,) each."""
    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


class DPOObjective(Module):
    """The DPO loss of a ``PeftModel`` as a module the training loop can call like a language model:
    ``objective(input_ids, labels=labels, attention_mask=mask).loss``.

    A batch holds 2B rows, the B chosen answers and then the B rejected ones
    (``data.preferences.collate_preferences``). The policy scores all 2B in one forward; the
    reference (``reference_logps``) in one more, without a graph.
    """

    def __init__(self, peft_model, beta: float = 0.1, label_smoothing: float = 0.0):
        super().__init__()
        if not hasattr(peft_model, "disable_adapter"):
            raise ValueError(f"DPO here needs a PeftModel (the reference is the model with its adapter "
                             f"disabled), got {type(peft_model).__name__}; wrap it with get_peft_model")
        self.policy = peft_model
        self.beta, self.label_smoothing = float(beta), float(label_smoothing)

    def forward(self, input_ids, labels=None, attention_mask=None) -> DPOOutput:
        if labels is None:
            raise ValueError("DPOObjective needs labels (-100 on the prompt); collate the pairs with "
                             "data.preferences.collate_preferences")
        n = np.shape(input_ids.data if isinstance(input_ids, Tensor) else input_ids)[0]
        if n % 2:
            raise ValueError(f"a DPO batch holds chosen rows then rejected rows (an even number), got "
                             f"{n} rows; collate with data.preferences.collate_preferences")
        policy = sequence_logps(self.policy, input_ids, labels, attention_mask)      # (2B,)
        reference = reference_logps(self.policy, input_ids, labels, attention_mask)  # (2B,)
        half = n // 2
        losses, chosen, rejected = dpo_loss(policy[:half], policy[half:], reference[:half],
                                            reference[half:], self.beta, self.label_smoothing)
        return DPOOutput(loss=losses.mean(), chosen_rewards=chosen, rejected_rewards=rejected)

    def save_pretrained(self, save_directory) -> None:
        """Save the adapter (what DPO trained), as ``PeftModel.save_pretrained``."""
        self.policy.save_pretrained(save_directory)


def evaluate_preferences(model, pairs, tokenizer, beta: float = 0.1, batch_size: int = 32,
                         max_len: int | None = None) -> dict:
    """{"loss", "reward_margin", "accuracy"} over ``pairs`` for a ``PeftModel`` (at ``beta``) or a
    ``DPOObjective`` (at its own β), in eval mode without a graph: the mean DPO loss, the mean
    chosen − rejected reward, and the share of pairs whose chosen reward is the larger (TRL's
    ``rewards/margins`` and ``rewards/accuracies``)."""
    if not pairs:
        raise ValueError("evaluate_preferences got no pairs; pass a non-empty held-out list")
    objective = model if isinstance(model, DPOObjective) else DPOObjective(model, beta)
    was_training = objective.training
    objective.eval()
    losses, margins = [], []
    try:
        with no_grad():
            for start in range(0, len(pairs), batch_size):
                batch = collate_preferences(pairs[start:start + batch_size], tokenizer, max_len)
                out = objective(batch["input_ids"], labels=batch["labels"],
                                attention_mask=batch["attention_mask"])
                n = len(pairs[start:start + batch_size])
                losses.append(out.loss.item() * n)
                margins.append(backend.to_numpy((out.chosen_rewards - out.rejected_rewards).data))
    finally:
        objective.train(was_training)
    margins = np.concatenate(margins)
    return {"loss": float(sum(losses) / len(pairs)), "reward_margin": float(margins.mean()),
            "accuracy": float((margins > 0).mean())}


def train_dpo(peft_model, pairs, tokenizer, steps: int = 100, lr: float = 1e-3, beta: float = 0.1,
              label_smoothing: float = 0.0, batch_size: int = 8, warmup: int = 10,
              max_len: int | None = 128, weight_decay: float = 0.0, eval_pairs=None,
              eval_every: int = 50, seed: int = 0, progress: bool = True, desc: str = "DPO"):
    """Train ``peft_model``'s adapter on preference ``pairs`` ({"prompt", "chosen", "rejected"}) with
    the DPO loss; returns the history of ``train.train`` (one record per step).

    Batches of ``batch_size`` pairs are drawn epoch after epoch in a seeded order (an epoch's last
    partial batch dropped); AdamW over the model's trainable parameters (the adapter's), linear
    warm-up then cosine decay, gradient clipping at 1.0; the run is deterministic for a seed. With ``eval_pairs``, every ``eval_every`` steps and after the
    last one the held-out ``evaluate_preferences`` figures join that step's record as
    ``eval_loss``, ``eval_reward_margin`` and ``eval_accuracy``.
    """
    if not pairs:
        raise ValueError("no preference pairs; pass a non-empty list of {prompt, chosen, rejected}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    backend.manual_seed(seed)
    objective = DPOObjective(peft_model, beta, label_smoothing)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; wrap it with get_peft_model first")
    optimizer = AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = LambdaLR(optimizer, WarmupCosine(min(warmup, steps - 1), steps))
    order_rng = np.random.default_rng([seed, 5])
    per_epoch = max(1, len(pairs) // batch_size)

    def batches():
        while True:                                   # epoch after epoch, each freshly shuffled
            order = order_rng.permutation(len(pairs))
            for b in range(per_epoch):
                chunk = [pairs[i] for i in order[b * batch_size:(b + 1) * batch_size]]
                yield collate_preferences(chunk, tokenizer, max_len)

    evals: list = []

    def eval_fn(_):
        figures = evaluate_preferences(objective, eval_pairs, tokenizer, max_len=max_len)
        evals.append(figures)
        return figures["loss"]

    # the rows of a batch come in chosen/rejected halves, which a micro-batch split would cut apart
    history = train(objective, batches(), optimizer, steps,
                    eval_fn=eval_fn if eval_pairs else None, eval_every=eval_every,
                    scheduler=scheduler, clip=1.0, progress=progress, seed=seed, desc=desc,
                    data_parallel=False)
    for record, figures in zip((h for h in history if "eval_loss" in h), evals):
        record["eval_reward_margin"] = figures["reward_margin"]
        record["eval_accuracy"] = figures["accuracy"]
    return history


__all__ = ["dpo_loss", "log_sigmoid", "sequence_logps", "reference_logps", "DPOObjective",
           "DPOOutput", "evaluate_preferences", "train_dpo"]
