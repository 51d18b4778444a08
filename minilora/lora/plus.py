"""LoRA+: a larger learning rate for B than for A (Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low Rank
Adaptation of Large Models").

The paper's argument (in the infinite-width limit): with one learning rate η for both
factors of ΔW = (α/r)·B·A, the updates of A and B cannot both be of the right size as the model
widens; A (r, in) sees inputs of width ``in`` while B (out, r) starts at zero and sees only r numbers,
so B should move faster. LoRA+ sets η_B = λ·η_A with a ratio λ ≥ 1 (the authors suggest 2^4 = 16
as a starting point) and reports faster fine-tuning at the same cost.

``create_loraplus_optimizer`` is ``peft.optimizers.create_loraplus_optimizer`` (PEFT 0.21) with the
same arguments, groups, names and order, built for minilora's optimizers (``optim.AdamW``,
``paged_optim.PagedAdamW``, ...), which take PyTorch's parameter groups. Four groups, in PEFT's
order (name: parameters; lr, weight decay):

0. "groupA": the ``lora_A`` factors and every other trainable matrix; lr, loraplus_weight_decay.
1. "embedding": the parameters of a LoRA layer over an ``nn.Embedding``; loraplus_lr_embedding,
   loraplus_weight_decay.
2. "groupB": the ``lora_B`` factors and trainable 1-D parameters without "bias" in their name;
   lr · loraplus_lr_ratio, loraplus_weight_decay.
3. "groupB_no_decay": those of group 2's kind with "bias" in their name; lr · loraplus_lr_ratio,
   weight decay 0.

PEFT puts a parameter in the no-decay group when transformers' ``get_parameter_names(model,
ALL_LAYERNORM_LAYERS)`` leaves it out (inside an ``nn.LayerNorm``) or its name holds "bias"; minilora
has no LayerNorm module (its norms are RMSNorm, which that list does not name), so the name is the
whole test here. minilora's LoRA wraps Linear layers only, so group 1 is empty today; it is kept so that
the groups line up with PEFT's index for index (a state_dict's ``param_groups`` then match).

Each group's lr is also its ``initial_lr``, so a schedule (``optim.LambdaLR``) scales every group by
the same factor and the ratio η_B / η_A holds at every step. tests/test_loraplus.py checks the groups,
that ratio 1 is plain AdamW bit for bit, and one step against PEFT's function with torch's AdamW.
"""
from __future__ import annotations

from ..nn import Embedding, Module


def _tuner_layer(model: Module, name: str):
    """The module that holds parameter ``name`` two levels up (``<layer>.lora_A.default.weight`` ->
    ``<layer>.lora_A``; PEFT's ``lora_embedding_A.default`` -> the layer), or None at the top level."""
    module_name = ".".join(name.split(".")[:-2])
    if not module_name:
        return None
    return model.get_submodule(module_name)


def loraplus_param_groups(model: Module, lr: float, loraplus_lr_ratio: float,
                          loraplus_lr_embedding: float = 1e-6,
                          loraplus_weight_decay: float = 0.0) -> list[dict]:
    """The four parameter groups of the table in the module docstring, as a list of
    {"params": [...], "weight_decay": ..., "lr": ...} dicts (PEFT's order; a group may be empty)."""
    group_a, embedding, group_b, group_b_no_decay = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = _tuner_layer(model, name)
        if isinstance(getattr(layer, "base_layer", None), Embedding):
            embedding.append(param)
        elif "lora_B" in name or param.ndim == 1:
            (group_b_no_decay if "bias" in name else group_b).append(param)
        else:
            group_a.append(param)
    return [
        {"params": group_a, "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": embedding, "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": group_b, "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": group_b_no_decay, "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]


def create_loraplus_optimizer(model: Module, optimizer_cls, lr: float, loraplus_lr_ratio: float,
                              loraplus_lr_embedding: float = 1e-6, **kwargs):
    """``optimizer_cls`` over ``model``'s trainable parameters in LoRA+'s four groups (module
    docstring): A at ``lr``, B at ``lr * loraplus_lr_ratio``, LoRA embedding factors at
    ``loraplus_lr_embedding``.

    ``kwargs`` go to ``optimizer_cls`` (betas, eps, ...), with ``lr`` added, as PEFT does; a
    ``loraplus_weight_decay`` among them (default 0.0) is popped and becomes the groups' weight decay,
    which overrides any ``weight_decay`` passed for the optimizer, again as in PEFT.
    """
    if loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio must be > 0 (the paper uses >= 1, e.g. 16), got "
                         f"{loraplus_lr_ratio}")
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding, weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters for LoRA+; wrap it with "
                         "get_peft_model(model, LoraConfig(...)) first")
    return optimizer_cls(groups, lr=lr, **kwargs)


__all__ = ["create_loraplus_optimizer", "loraplus_param_groups"]
