"""Resumable training checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint is a folder ``checkpoint-NNNNNN`` (the step) inside the run's checkpoint folder, with

* ``training_state.safetensors``: the optimizer's parameters (``param.{i}``, float32 as trained, so
  a resumed run starts from the same bits) and the optimizer's buffers (``state.{i}.exp_avg``,
  ``state.{i}.exp_avg_sq`` for AdamW), numbered in ``param_groups`` order as torch numbers them;
* ``trainer_state.json``: the step, the optimizer's per-parameter step counts and hyperparameters,
  the schedule's position (``scheduler.state_dict()``), the state of every random generator the run
  draws from (minilora's ``backend.rng()`` and the NumPy Generators the caller names), the history
  so far, and the divergence watch's counters. Arrays in safetensors, the rest in JSON: never pickle.

The data's position is the step itself: a ``step -> batch`` function is called with the next step,
and an iterator is replayed from its start (``train`` draws and drops the batches already used),
after which the generators are set to their saved states.

Saving is atomic per checkpoint (``fileio.atomic_folder``): the files go to a hidden temporary
folder that takes the checkpoint's name only when complete, so a run killed mid-save leaves the
previous checkpoints whole (the temporary is removed by the next save). The folder layout
follows Hugging Face Trainer's ``checkpoint-*`` folders; the optimizer layout is torch's
``Optimizer.state_dict()``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from . import backend
from .fileio import atomic_folder, save_safetensors_atomic, write_json_atomic
from .models.hf_io import CheckpointError

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
ARRAYS_FILE = "training_state.safetensors"
FORMAT_VERSION = 1


class ResumeError(CheckpointError):
    """A checkpoint that cannot resume this run (missing, incomplete, or for another model)."""


def rng_states(generators: dict) -> dict:
    """{name: the generator's bit-generator state} (plain dicts of ints and strings: JSON-ready)."""
    return {name: g.bit_generator.state for name, g in generators.items()}


def set_rng_states(generators: dict, states: dict, where) -> None:
    """Put each named generator back in its saved state; a name missing from the file is an error."""
    for name, g in generators.items():
        if name not in states:
            raise ResumeError(f"{where}: no saved state for the random generator {name!r} (saved: "
                              f"{sorted(states)}); resume with the generators the run was started with")
        g.bit_generator.state = states[name]


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def list_checkpoints(root) -> list[Path]:
    """The complete checkpoints in ``root`` (those with their ``trainer_state.json``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.name.startswith(PREFIX) and d.name[len(PREFIX):].isdigit() and (d / STATE_FILE).is_file():
            found.append((int(d.name[len(PREFIX):]), d))
    return [d for _, d in sorted(found)]


def find_checkpoint(path) -> Path:
    """``path`` itself if it is a checkpoint, else the latest complete checkpoint inside it."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise ResumeError(f"{path}: no checkpoint to resume from (expected {STATE_FILE} in it, or "
                          f"{PREFIX}* folders holding one); pass the folder a run saved its "
                          "checkpoints in")
    return found[-1]


def save_checkpoint(root, step: int, optimizer, scheduler, rng: dict, history: list,
                    watch: dict, param_names: list, keep: int = 2) -> Path:
    """Write ``root/checkpoint-{step}`` atomically and keep the newest ``keep`` checkpoints.

    ``rng`` is ``rng_states(...)`` taken when the step ended (not now: an interrupted step has
    already drawn from the generators), ``watch`` the divergence watch's counters, ``param_names``
    the optimizer's parameters' names (checked on resume); ``keep`` >= 1."""
    root = Path(root)
    arrays, groups, steps = {}, [], {}
    index = 0
    for group in optimizer.param_groups:
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        groups.append({**hyper, "n_params": len(group["params"])})
        for p in group["params"]:
            arrays[f"param.{index}"] = backend.to_numpy(p.data)
            st = optimizer.state.get(id(p))
            if st is not None:
                steps[str(index)] = int(st["step"])
                for k, v in st.items():
                    if k != "step":
                        arrays[f"state.{index}.{k}"] = backend.to_numpy(v)
            index += 1
    final = root / checkpoint_name(step)
    with atomic_folder(final, owned=(ARRAYS_FILE, STATE_FILE)) as tmp:
        save_safetensors_atomic(arrays, tmp / ARRAYS_FILE)
        write_json_atomic(tmp / STATE_FILE, {
            "format_version": FORMAT_VERSION, "step": int(step), "param_names": list(param_names),
            "optimizer": {"param_groups": groups, "steps": steps},
            "scheduler": scheduler.state_dict() if hasattr(scheduler, "state_dict") else None,
            "rng": rng, "history": list(history), "watch": watch})
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path) -> tuple[dict, dict]:
    """(the JSON state, the arrays) of the checkpoint at ``path`` (``find_checkpoint`` resolves it)."""
    from safetensors.numpy import load_file
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResumeError(f"{path / STATE_FILE}: cannot read it ({e}); resume from an earlier "
                          "checkpoint") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ResumeError(f"{path / STATE_FILE}: format_version is not {FORMAT_VERSION}; it was "
                          "written by another minilora version or is not a training checkpoint")
    try:
        arrays = load_file(str(path / ARRAYS_FILE))
    except Exception as e:  # safetensors raises its own error types; the message names the file
        raise ResumeError(f"{path / ARRAYS_FILE}: cannot read it ({type(e).__name__}: {e}); resume "
                          "from an earlier checkpoint") from None
    return state, arrays


def restore(path, state: dict, arrays: dict, optimizer, scheduler, param_names: list) -> None:
    """Put the parameters' values, the optimizer's state and hyperparameters and the schedule's
    position back; refuses (``ResumeError``) a checkpoint of other parameters."""
    opt = state["optimizer"]
    groups = opt["param_groups"]
    if state["param_names"] != list(param_names) or len(groups) != len(optimizer.param_groups) or any(
            g["n_params"] != len(own["params"]) for g, own in zip(groups, optimizer.param_groups)):
        raise ResumeError(f"{path}: the checkpoint holds {len(state['param_names'])} parameters in "
                          f"{len(groups)} groups, not this optimizer's {len(param_names)} in "
                          f"{len(optimizer.param_groups)}; resume with the same model, targets and "
                          "optimizer settings")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        saved = arrays.get(f"param.{i}")
        if saved is None or saved.shape != p.shape or saved.dtype != p.data.dtype:
            got = "missing" if saved is None else f"{saved.shape} {saved.dtype}"
            raise ResumeError(f"{path}: parameter {param_names[i]} is {got} in the checkpoint, "
                              f"{p.shape} {p.data.dtype} here; resume with the same model")
        if not np.isfinite(saved).all():
            raise ResumeError(f"{path}: parameter {param_names[i]} holds inf or NaN; resume from an "
                              "earlier checkpoint")
        p.data[...] = backend.get_xp(p.data).asarray(saved)    # in place: replicas share p.data
    state_dict = {"state": {}, "param_groups": []}
    for i, p in enumerate(params):
        if str(i) in opt["steps"]:
            prefix = f"state.{i}."
            buffers = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            state_dict["state"][i] = {"step": opt["steps"][str(i)], **buffers}
    start = 0
    for g, own in zip(groups, optimizer.param_groups):
        hyper = {k: (tuple(v) if isinstance(own.get(k), tuple) else v)
                 for k, v in g.items() if k != "n_params"}
        state_dict["param_groups"].append({**hyper, "params": list(range(start, start + g["n_params"]))})
        start += g["n_params"]
    optimizer.load_state_dict(state_dict)
    if scheduler is not None and hasattr(scheduler, "load_state_dict") and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])


def all_finite(params) -> bool:
    """Whether every parameter's values are finite (a checkpoint is written only then)."""
    return all(bool(backend.get_xp(p.data).isfinite(p.data).all()) for p in params)


__all__ = ["ResumeError", "find_checkpoint", "list_checkpoints", "save_checkpoint",
           "load_checkpoint", "restore", "rng_states", "set_rng_states", "all_finite"]
