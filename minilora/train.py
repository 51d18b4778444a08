"""The training loop, shared by pretraining and LoRA fine-tuning.

One step is the same in both: forward with labels (``model(input_ids, labels=...).loss``), backward,
clip the global gradient norm, optimizer step, schedule step. Forward and backward run through
``data_parallel.forward_backward``: on a CPU with two or more threads the batch is split into
micro-batches computed at once on replicas of the model, their gradients summed (the full batch's
gradient, up to float32 rounding). What differs is only *which* parameters
the optimizer holds (all of them when pretraining; the LoRA factors A and B when fine-tuning), so the
loop clips exactly the optimizer's parameters and touches nothing else of the model.

``train`` returns a history (one dict per step: step, loss, lr, tokens_per_s, grad_norm, and
eval_loss on evaluation steps) ready to plot, shows a tqdm progress bar with the loss and the
throughput, evaluates every ``eval_every`` steps, and can save checkpoints with ``save_pretrained``.
With ``seed`` set, the run is deterministic: same seed, same batches, same losses.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import backend
from .data_parallel import forward_backward, model_loss
from .optim import Optimizer, clip_grad_norm_
from .tensor import Tensor, no_grad


def _unpack(batch) -> tuple:
    """(input_ids, labels, attention_mask) from a dict (data.collate) or a tuple (random_batches)."""
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError(f"a batch dict needs 'input_ids' (and 'labels'), got keys {sorted(batch)}")
        ids = batch["input_ids"]
        return ids, batch.get("labels", ids), batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return (batch[0], batch[1], batch[2] if len(batch) == 3 else None)
    raise ValueError("a batch must be a dict with input_ids/labels[/attention_mask] or a tuple "
                     f"(input_ids, labels[, attention_mask]), got {type(batch).__name__}")


def _batch_source(batches) -> Callable[[int], object]:
    """A function step -> batch, from a callable(step), a callable(), an iterator or an iterable."""
    if callable(batches) and not hasattr(batches, "__next__"):
        try:
            import inspect
            takes_step = len(inspect.signature(batches).parameters) >= 1
        except (TypeError, ValueError):
            takes_step = True
        return batches if takes_step else (lambda step: batches())
    it = iter(batches)

    def next_batch(step):
        try:
            return next(it)
        except StopIteration:
            raise ValueError(f"the batch iterator ran out at step {step}; pass more batches, an "
                             "endless generator, or a function step -> batch") from None
    return next_batch


def evaluate(model, batches: Iterable) -> float:
    """Mean loss over ``batches`` (an iterable), in eval mode and without building a graph."""
    was_training = getattr(model, "training", True)
    model.eval()
    total, n = 0.0, 0
    try:
        with no_grad():
            for batch in batches:
                loss = model_loss(model, *_unpack(batch))
                total += loss.item()
                n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate got no batches")
    return total / n


def train(model, batches, optimizer: Optimizer, steps: int, eval_fn: Callable | None = None,
          eval_every: int = 100, scheduler=None, clip: float | None = 1.0, progress: bool = True,
          checkpoint_dir=None, checkpoint_every: int | None = None, seed: int | None = None,
          desc: str = "train") -> list[dict]:
    """Run ``steps`` optimizer steps; return the history (a list of dicts, one per step).

    batches: a function ``step -> batch`` (or ``() -> batch``), or an iterator/iterable of batches;
        a batch is a dict with input_ids, labels (and attention_mask), or a tuple (input_ids, labels).
    eval_fn: ``model -> float`` (e.g. ``lambda m: evaluate(m, val_batches)``), run in eval mode under
        no_grad every ``eval_every`` steps and after the last one; stored as ``eval_loss``.
    scheduler: anything with ``step()`` (``optim.LambdaLR``), stepped after each optimizer step.
    clip: max global L2 norm of the optimizer's parameters' gradients (None: no clipping).
    checkpoint_dir: if given, ``model.save_pretrained`` there every ``checkpoint_every`` steps (if
        set) and at the end.
    seed: seeds minilora's generators first (batches drawn from ``backend.rng()``, dropout masks).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    if seed is not None:
        backend.manual_seed(seed)
    next_batch = _batch_source(batches)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    history: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=desc, dynamic_ncols=True, leave=True)

    def run_eval(record: dict) -> None:
        was_training = model.training
        model.eval()
        try:
            with no_grad():
                record["eval_loss"] = float(eval_fn(model))
        finally:
            model.train(was_training)

    model.train()
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            ids, labels, mask = _unpack(next_batch(step - 1))
            # forward + backward, the batch split over the CPU's threads (data_parallel)
            loss_value = forward_backward(model, ids, labels, mask).item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at step {step}; lower the learning "
                                         "rate or check the data (labels all -100?)")
            grad_norm = clip_grad_norm_(params, clip) if clip is not None else None
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad()
            if scheduler is not None:
                scheduler.step()
            backend.synchronize()
            dt = time.perf_counter() - t0
            n_tokens = int(np.prod(np.shape(ids.data if isinstance(ids, Tensor) else ids)))
            record = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": n_tokens / dt,
                      "grad_norm": grad_norm}
            if eval_fn is not None and (step % eval_every == 0 or step == steps):
                run_eval(record)
            history.append(record)
            if checkpoint_dir is not None and checkpoint_every and step % checkpoint_every == 0:
                model.save_pretrained(Path(checkpoint_dir))
            if bar is not None:
                post = {"loss": f"{loss_value:.3f}", "tok/s": f"{n_tokens / dt:,.0f}"}
                last_eval = next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None)
                if last_eval is not None:
                    post["eval"] = f"{last_eval:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if checkpoint_dir is not None:
        model.save_pretrained(Path(checkpoint_dir))
    return history


__all__ = ["train", "evaluate"]
