"""Which modules of a model a LoraConfig adapts: ``plan_injection`` (PEFT's target matching).

LoRA (Hu et al., 2021) adapts chosen weight matrices of a frozen model; PEFT chooses them by name
(``target_modules``, ``layers_to_transform``, ``modules_to_save``). This module answers the question
without changing anything, so that ``lora/model.py`` (which injects) and ``lora/io.py`` (which checks
an adapter file against a model before touching it) both ask it, and neither imports the other.
"""
from __future__ import annotations

import dataclasses

from ..nn import Module
from .config import DEFAULT_TARGET_MODULES, LoraConfig, matches
from .layer import LoraLinear, ModulesToSaveWrapper, is_linear_like


def _output_head_names(model: Module) -> set:
    """Names of the output projection(s), which "all-linear" leaves alone (as PEFT does)."""
    names = {n for n, _ in model.named_modules() if n == "lm_head" or n.endswith(".lm_head")}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
        names |= {n for n, m in model.named_modules() if m is head}
    return names


def _plain_modules(model: Module):
    """(name, module) of ``model``, skipping the insides of LoRA and saved-module wrappers."""
    inside, out = [], []
    for n, m in model.named_modules():
        if any(n.startswith(p + ".") for p in inside):
            continue
        out.append((n, m))
        if isinstance(m, (LoraLinear, ModulesToSaveWrapper)):
            inside.append(n)
    return out


def _is_target_type(m) -> bool:
    return is_linear_like(m) or isinstance(m, LoraLinear)


def resolve_targets(model: Module, config: LoraConfig):
    """config.target_modules with None -> Llama's default (q_proj, v_proj) and "all-linear" -> the
    names of every Linear except the output head, as PEFT records them in the saved config."""
    if config.target_modules is None:
        return list(DEFAULT_TARGET_MODULES)
    if config.target_modules == "all-linear":
        heads = _output_head_names(model)
        return sorted({n.rsplit(".", 1)[-1] for n, m in _plain_modules(model)
                       if n and _is_target_type(m) and n not in heads})
    return config.target_modules


def plan_injection(model: Module, config: LoraConfig):
    """Which modules ``config`` adapts in ``model``, without changing anything.

    Returns (config with resolved target_modules, [names of Linear layers to adapt], [names of
    modules to save]). Raises ValueError naming the Linear layers that exist when the targets match
    none of them, or when a modules_to_save entry matches nothing.
    """
    targets = resolve_targets(model, config)
    if targets != config.target_modules:
        config = dataclasses.replace(config, target_modules=targets)
    modules = _plain_modules(model)
    lora_names, non_linear = [], []
    for n, m in modules:
        if not n or not matches(config, n):
            continue
        if _is_target_type(m):
            lora_names.append(n)
        elif not isinstance(m, ModulesToSaveWrapper):
            non_linear.append(f"{n} ({type(m).__name__})")
    if not lora_names:
        linear = [n for n, m in modules if _is_target_type(m)]
        short = sorted({n.rsplit(".", 1)[-1] for n in linear})
        why = f"; it matched modules that are not Linear: {non_linear[:3]}" if non_linear else ""
        extra = (f" within layers_to_transform={config.layers_to_transform}"
                 if config.layers_to_transform is not None else "")
        raise ValueError(f"target_modules={config.target_modules!r} matched no Linear layer{extra}"
                         f"{why}; the model's Linear layers are named {short} "
                         f"(e.g. {linear[0] if linear else 'none'})")
    return config, lora_names, modules_to_save_names(modules, config.modules_to_save)


def modules_to_save_names(modules, modules_to_save) -> list:
    """The names among ``modules`` ((name, module) pairs) that the ``modules_to_save`` entries pick,
    in order, each once. PEFT's rule is a plain suffix of the dotted name ("norm" also finds
    "...input_layernorm"), so that a config names the same modules in both libraries; an entry that
    matches nothing is a ValueError naming the model's top-level modules."""
    saved = []
    for wanted in modules_to_save or []:
        found = [n for n, _ in modules if n and n.endswith(wanted)]
        if not found:
            raise ValueError(f"modules_to_save entry {wanted!r} matches no module of the model; its "
                             f"top-level modules are {[n for n, _ in modules if n and '.' not in n]}")
        saved += [n for n in found if n not in saved]
    return saved


__all__ = ["plan_injection", "resolve_targets", "modules_to_save_names"]
