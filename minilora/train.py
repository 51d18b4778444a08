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
throughput, and evaluates every ``eval_every`` steps. With ``seed`` set, the run is deterministic:
same seed, same batches, same losses.

Faults are caught before they reach the weights: a non-finite loss or gradient norm is found
before the optimizer step, and stops the run (``NonFiniteError``) or skips the step
(``on_nonfinite="skip"``: counted in ``history.skipped_steps``). A run that diverges (its loss
well above where it started, or gradients exactly zero step after step) is warned about
(``DivergenceWarning``) and marked in ``history.diverged``, so that a command can refuse to save it
over a good model. With ``checkpoint_dir`` the run is resumable (``resume.py``: weights, AdamW's
moments, the schedule, the data position and every generator's state), Ctrl-C saves a checkpoint
before it stops (``TrainingInterrupted``), and ``resume_from`` continues a run bit for bit as if it
had never stopped.
"""
from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import backend, resume, settings
from .data_parallel import DataParallel, model_loss
from .fast import parallel
from .optim import Optimizer, clip_grad_norm_, global_grad_norm
from .tensor import Tensor, no_grad

# A run has diverged when the mean loss of its last DIVERGENCE_WINDOW steps is more than
# DIVERGENCE_MARGIN nats above its first step's loss (training lowers the loss; a nat above the start
# is more than any warm-up wobble), or when the gradient norm is exactly 0.0 for ZERO_GRAD_STEPS steps
# in a row (float32 softmax saturated, e.g. after lr 1e6: the loss freezes and nothing learns again).
DIVERGENCE_MARGIN = 1.0
DIVERGENCE_WINDOW = 10
ZERO_GRAD_STEPS = 5


class TrainingError(RuntimeError):
    """A training run that cannot go on (the message says at which step, and what to change)."""


class NonFiniteError(TrainingError, FloatingPointError):
    """The loss or the gradients became inf or NaN; the step was not applied to the weights."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``: ``.step`` steps were done and saved in the checkpoint ``.checkpoint``
    (None without a checkpoint_dir); ``train(..., resume_from=.checkpoint)`` continues the run."""

    def __init__(self, message: str, step: int, steps: int, checkpoint):
        super().__init__(message)
        self.step, self.steps, self.checkpoint = step, steps, checkpoint


class DivergenceWarning(UserWarning):
    """The run's loss rose well above its start, or its gradients stayed exactly zero."""


class History(list):
    """The list of per-step records ``train`` returns, with two more facts about the run:
    ``diverged`` (None, or why the run looks diverged) and ``skipped_steps`` (the steps whose
    non-finite loss or gradients were skipped with ``on_nonfinite="skip"``)."""

    def __init__(self, records=()):
        super().__init__(records)
        self.diverged: str | None = None
        self.skipped_steps: list[int] = []


class _DivergenceWatch:
    """Follows the loss and the gradient norm step by step; ``reason`` says why the run diverged."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.first_loss = state.get("first_loss")
        self.recent = list(state.get("recent", []))
        self.zero_streak = int(state.get("zero_streak", 0))
        self.reason = state.get("reason")

    def state(self) -> dict:
        return {"first_loss": self.first_loss, "recent": self.recent,
                "zero_streak": self.zero_streak, "reason": self.reason}

    def update(self, step: int, loss: float, grad_norm: float) -> str | None:
        """Record one applied step; return the reason the first time divergence shows."""
        if self.first_loss is None:
            self.first_loss = loss
        self.recent = (self.recent + [loss])[-DIVERGENCE_WINDOW:]
        self.zero_streak = self.zero_streak + 1 if grad_norm == 0.0 else 0
        if self.reason is not None:
            return None
        mean = sum(self.recent) / len(self.recent)
        if len(self.recent) == DIVERGENCE_WINDOW and mean > self.first_loss + DIVERGENCE_MARGIN:
            self.reason = (f"the loss rose from {self.first_loss:.4g} at the first step to a mean of "
                           f"{mean:.4g} over steps {step - DIVERGENCE_WINDOW + 1}-{step}")
        elif self.zero_streak >= ZERO_GRAD_STEPS:
            self.reason = (f"the gradients were exactly zero for {self.zero_streak} steps in a row "
                           f"(steps {step - self.zero_streak + 1}-{step}): nothing learns any more")
        return self.reason


@contextmanager
def _interrupts_deferred():
    """Hold Ctrl-C until the block ends, so an update is never left half applied (the main thread
    only: elsewhere Python delivers no signals anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught:
        raise KeyboardInterrupt


def _nonfinite_names(params, names) -> str:
    """The names of the parameters whose gradient holds inf or NaN (the first few)."""
    bad = [names[i] for i, p in enumerate(params) if p.grad is not None
           and not bool(backend.get_xp(p.grad).isfinite(p.grad).all())]
    return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


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
          desc: str = "train", data_parallel: bool | None = None, on_nonfinite: str = "stop",
          resume_from=None, rngs: dict | None = None, keep_checkpoints: int = 2) -> History:
    """Run optimizer steps up to step ``steps``; return the history (a ``History``: a list of dicts,
    one per step, with ``.diverged`` and ``.skipped_steps``).

    batches: a function ``step -> batch`` (or ``() -> batch``), or an iterator/iterable of batches;
        a batch is a dict with input_ids, labels (and attention_mask), or a tuple (input_ids, labels).
    eval_fn: ``model -> float`` (e.g. ``lambda m: evaluate(m, val_batches)``), run in eval mode under
        no_grad every ``eval_every`` steps and after the last one; stored as ``eval_loss``.
    scheduler: anything with ``step()`` (``optim.LambdaLR``), stepped after each optimizer step
        (skipped steps too, so the schedule keeps to the step count); its ``state_dict()`` is saved
        in checkpoints when it has one.
    clip: max global L2 norm of the optimizer's parameters' gradients (None: no clipping, and the
        history's grad_norm is None; the norm is still computed, to catch inf and NaN).
    on_nonfinite: what a non-finite loss or gradient norm does, found before the optimizer step so
        it never reaches the weights: "stop" raises ``NonFiniteError`` (the weights are those of
        the step before); "skip" drops the step's gradients, records ``"skipped": True`` and the step
        in ``history.skipped_steps``, and goes on.
    checkpoint_dir: if given, a resumable checkpoint (``resume.py``) is saved in
        ``checkpoint_dir/checkpoint-NNNNNN`` every ``checkpoint_every`` steps (if set), at the end,
        and on Ctrl-C, the newest ``keep_checkpoints`` kept; at the end the model is also saved
        there with ``save_pretrained``. A checkpoint is written only while the weights are finite.
    resume_from: a checkpoint folder, or a checkpoint_dir (its newest checkpoint): continue that run
        from its step, with the same model, optimizer, scheduler, batches and ``rngs`` built as the
        first time; the result equals the uninterrupted run's bit for bit. Its checkpoint_dir is the
        default one.
    rngs: {name: numpy Generator} the batches draw from, saved and restored with minilora's own
        ``backend.rng()`` (which dropout and ``data.random_batches`` use by default).
    seed: seeds minilora's generators first (batches drawn from ``backend.rng()``, dropout masks).
    data_parallel: wrap the model in ``DataParallel`` for the steps. None (default): when it helps,
        on the CPU with more than one thread (``parallel.num_threads()``) outside reference mode; the
        wrapper then splits a batch only into micro-batches of at least
        ``settings.MIN_TOKENS_PER_MICRO_BATCH`` tokens. True: wrap, and split every batch of two or
        more rows whatever its size (still not on a GPU, with one thread or in reference mode,
        where the wrapper is the plain call). False: never.

    Ctrl-C stops the run between updates (never inside one) and raises ``TrainingInterrupted``,
    after saving a checkpoint of the last finished step when there is a checkpoint_dir.
    The first call in a process also makes malloc keep freed host memory for reuse
    (``backend.keep_freed_host_memory()``: a step's buffers are then not page-faulted in again
    every step); ``MINILORA_KEEP_FREED_MEMORY=0`` turns that off.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    if keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
    backend.keep_freed_host_memory()        # process-wide and idempotent: a no-op after the first
    if seed is not None:
        backend.manual_seed(seed)
    replays = hasattr(batches, "__next__") or not callable(batches)   # an iterator is replayed
    next_batch = _batch_source(batches)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    by_id = {id(p): name for name, p in model.named_parameters()} if hasattr(
        model, "named_parameters") else {}
    names = [by_id.get(id(p), f"param_groups parameter {i}") for i, p in enumerate(params)]

    def generators() -> dict:
        return {"backend": backend.rng(), **(rngs or {})}

    history = History()
    watch = _DivergenceWatch()
    start = 0
    if resume_from is not None:
        where = resume.find_checkpoint(resume_from)
        state, arrays = resume.load_checkpoint(where)
        if state["step"] > steps:
            raise resume.ResumeError(f"{where}: the checkpoint is at step {state['step']}, past "
                                     f"steps={steps}; pass steps >= {state['step']}")
        resume.restore(where, state, arrays, optimizer, scheduler, names)
        start = state["step"]
        history.extend(state["history"])
        history.skipped_steps = [h["step"] for h in history if h.get("skipped")]
        watch = _DivergenceWatch(state["watch"])
        history.diverged = watch.reason
        if replays:
            for s in range(start):      # the data's position: draw and drop the batches used
                next_batch(s)
        resume.set_rng_states(generators(), state["rng"], where)
        if checkpoint_dir is None:
            checkpoint_dir = where.parent
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, desc=desc, dynamic_ncols=True, leave=True)

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

    def save(step: int, rng: dict) -> Path:
        if not resume.all_finite(params):
            raise NonFiniteError(f"the weights hold inf or NaN after step {step}, so no checkpoint "
                                 "was written; lower the learning rate")
        return resume.save_checkpoint(checkpoint_dir, step, optimizer, scheduler, rng, history,
                                      watch.state(), names, keep=keep_checkpoints)

    done, done_rng = start, resume.rng_states(generators())   # the last finished step, and the
    raw_model.train()                                          # generators' states when it ended
    try:
        for step in range(start + 1, steps + 1):
            t0 = time.perf_counter()
            input_ids, labels, mask = _unpack(next_batch(step - 1))
            loss = model(input_ids, labels=labels, attention_mask=mask).loss
            loss_value = loss.item()
            grad_norm, fault = None, None
            if not math.isfinite(loss_value):
                fault = f"the loss became {loss_value} at step {step}"
            else:
                loss.backward()
                # the norm is taken (and clipped) before the update, so inf/NaN never reach it
                grad_norm = (clip_grad_norm_(params, clip) if clip is not None
                             else global_grad_norm(params))
                if not math.isfinite(grad_norm):
                    fault = (f"the gradient norm became {grad_norm} at step {step} (in "
                             f"{_nonfinite_names(params, names)})")
            lr = optimizer.param_groups[0]["lr"]
            if fault is not None and on_nonfinite == "stop":
                optimizer.zero_grad()
                raise NonFiniteError(f"{fault}; the weights are those after step {step - 1}: lower "
                                     "the learning rate or check the data (labels all -100?)")
            with _interrupts_deferred():   # the update and its bookkeeping, whole or not at all
                if fault is None:
                    optimizer.step()
                optimizer.zero_grad()
                if scheduler is not None:
                    scheduler.step()
                backend.synchronize()
                dt = time.perf_counter() - t0
                n_tokens = int(np.prod(np.shape(input_ids.data if isinstance(input_ids, Tensor)
                                                else input_ids)))
                record = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": n_tokens / dt,
                          "grad_norm": grad_norm if clip is not None else None}
                if fault is not None:
                    record["skipped"] = True
                    history.skipped_steps.append(step)
                history.append(record)
                done, done_rng = step, resume.rng_states(generators())
            if fault is None:
                reason = watch.update(step, loss_value, grad_norm)
                if reason is not None:
                    history.diverged = reason
                    warnings.warn(DivergenceWarning(f"training diverged: {reason}; lower the "
                                                    "learning rate"), stacklevel=2)
            if eval_fn is not None and (step % eval_every == 0 or step == steps):
                run_eval(record)
            if checkpoint_dir is not None and checkpoint_every and step % checkpoint_every == 0:
                with _interrupts_deferred():   # Ctrl-C waits for the folder's swap and clean-up
                    save(step, done_rng)
            if bar is not None:
                post = {"loss": f"{loss_value:.3f}", "tok/s": f"{n_tokens / dt:,.0f}"}
                last_eval = next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None)
                if last_eval is not None:
                    post["eval"] = f"{last_eval:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
    except KeyboardInterrupt:
        saved = None
        if checkpoint_dir is not None:
            saved = save(done, done_rng)
        where = (f"; checkpoint saved in {saved}, resume with resume_from={str(saved)!r}" if saved
                 else "; no checkpoint_dir, so nothing was saved")
        raise TrainingInterrupted(f"interrupted after step {done} of {steps}{where}", done, steps,
                                  saved) from None
    finally:
        if bar is not None:
            bar.close()
    if history.skipped_steps:
        warnings.warn(f"skipped {len(history.skipped_steps)} of {steps} steps with a non-finite loss "
                      f"or gradient (first at step {history.skipped_steps[0]})", RuntimeWarning,
                      stacklevel=2)
    if checkpoint_dir is not None:
        # the model first, then the checkpoint: a folder-wide save of the model cannot drop it
        if not resume.all_finite(params):
            raise NonFiniteError("the weights hold inf or NaN at the end of training, so they were "
                                 "not saved; lower the learning rate")
        raw_model.save_pretrained(Path(checkpoint_dir))
        if done > 0:
            save(done, done_rng)
    return history


__all__ = ["train", "evaluate", "History", "TrainingError", "NonFiniteError", "TrainingInterrupted",
           "DivergenceWarning"]
