"""The training loop, shared by pretraining and LoRA fine-tuning.

One step is the textbook's, in both: forward with labels, backward, clip the global gradient norm,
optimizer step, schedule step::

    loss = model(input_ids, labels=labels, attention_mask=mask).loss
    loss.backward()
    clip_grad_norm_(params, clip); optimizer.step(); optimizer.zero_grad()

What differs is only *which* parameters the optimizer holds (all of them when pretraining; the LoRA
factors A and B when fine-tuning), so the loop clips exactly the optimizer's parameters and touches
nothing else of the model. On a CPU with two or more threads the loop opts into data parallelism as
PyTorch code opts into DistributedDataParallel: ``model = DataParallel(model)`` (``data_parallel.py``)
splits each batch into micro-batches computed at once on replicas of the model, and the loss's
``backward()`` sums their gradients (the full batch's gradient, up to float32 rounding). The step
reads the same either way.

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

from . import backend, settings
from .data_parallel import DataParallel, model_loss
from .fast import parallel
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


def _wants_data_parallel(data_parallel) -> bool:
    """train()'s ``data_parallel`` switch: None means "when it helps" (CPU, threads, fast path)."""
    if data_parallel is None:
        return (not settings.reference_mode() and backend.get_device() == "cpu"
                and parallel.num_threads() > 1)
    if not isinstance(data_parallel, bool):
        raise ValueError(f"data_parallel must be None, True or False, got {data_parallel!r}")
    return data_parallel


def train(model, batches, optimizer: Optimizer, steps: int, eval_fn: Callable | None = None,
          eval_every: int = 100, scheduler=None, clip: float | None = 1.0, progress: bool = True,
          checkpoint_dir=None, checkpoint_every: int | None = None, seed: int | None = None,
          desc: str = "train", data_parallel: bool | None = None) -> list[dict]:
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
    data_parallel: wrap the model in ``DataParallel`` for the steps. None (default): when it helps,
        on the CPU with more than one thread (``parallel.num_threads()``) outside reference mode; the
        wrapper then splits a batch only into micro-batches of at least
        ``settings.MIN_TOKENS_PER_MICRO_BATCH`` tokens. True: wrap, and split every batch of two or
        more rows whatever its size (still not on a GPU, with one thread or in reference mode,
        where the wrapper is the plain call). False: never.

    The first call in a process also makes malloc keep freed host memory for reuse
    (``backend.keep_freed_host_memory()``: a step's buffers are then not page-faulted in again
    every step); ``MINILORA_KEEP_FREED_MEMORY=0`` turns that off.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    backend.keep_freed_host_memory()        # process-wide and idempotent: a no-op after the first
    if seed is not None:
        backend.manual_seed(seed)
    next_batch = _batch_source(batches)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    history: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=desc, dynamic_ncols=True, leave=True)

    # As with torch's DistributedDataParallel: the steps call the wrapper, evaluation and
    # checkpoints the model itself (nanoGPT's ``raw_model``).
    raw_model = model
    if _wants_data_parallel(data_parallel):
        model = DataParallel(raw_model, n_threads=parallel.num_threads() if data_parallel else None)

    def run_eval(record: dict) -> None:
        was_training = raw_model.training
        raw_model.eval()
        try:
            with no_grad():
                record["eval_loss"] = float(eval_fn(raw_model))
        finally:
            raw_model.train(was_training)

    raw_model.train()
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            input_ids, labels, mask = _unpack(next_batch(step - 1))
            loss = model(input_ids, labels=labels, attention_mask=mask).loss
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at step {step}; lower the learning "
                                         "rate or check the data (labels all -100?)")
            loss.backward()
            grad_norm = clip_grad_norm_(params, clip) if clip is not None else None
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad()
            if scheduler is not None:
                scheduler.step()
            backend.synchronize()
            dt = time.perf_counter() - t0
            n_tokens = int(np.prod(np.shape(input_ids.data if isinstance(input_ids, Tensor)
                                            else input_ids)))
            record = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": n_tokens / dt,
                      "grad_norm": grad_norm}
            if eval_fn is not None and (step % eval_every == 0 or step == steps):
                run_eval(record)
            history.append(record)
            if checkpoint_dir is not None and checkpoint_every and step % checkpoint_every == 0:
                raw_model.save_pretrained(Path(checkpoint_dir))
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
        raw_model.save_pretrained(Path(checkpoint_dir))
    return history


__all__ = ["train", "evaluate"]
