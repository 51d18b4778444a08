"""LoRA (Hu et al., 2021): frozen base weights plus trainable low-rank updates ΔW = (α/r)·B·A.

PEFT's API and file format (Hugging Face PEFT 0.21: its documentation and source), from scratch:

- ``LoraConfig``: r, lora_alpha, target_modules, lora_dropout, bias, use_rslora, init_lora_weights, ...
- ``get_peft_model(model, config)`` -> ``PeftModel``: inject, freeze, merge, switch, save, load.
- ``LoraLinear``: the layer, h = W0·x + (α/r)·B·(A·x), with A: (r, in) and B: (out, r).
- ``fused``: the same layer as one autograd op (``lora_linear``), its fast twin.
- ``merge``: the formula one step at a time (scaling, delta weight, merge, unmerge, trace).
- ``dora``: DoRA (Liu et al. 2024, ``use_dora=True``), a trained magnitude per row times the direction.
- ``init``: PiSSA, OLoRA and LoftQ, adapters started from W0 (and their conversion to plain LoRA).
- ``IA3Config``: (IA)³ (Liu et al., 2022), learned vectors that rescale activations (``ia3``).
- ``add_weighted_adapter``: combine adapters ("cat" exact, "svd" / "linear" approximate).
- ``mixed``: several adapters in one batch, ``model(ids, adapter_names=[...])`` (PEFT's mixed batches).
- ``create_loraplus_optimizer``: LoRA+ (Hayou et al. 2024), B trained at a larger lr than A.
"""
from . import dora, init, merge  # noqa: F401
from .combine import add_weighted_adapter  # noqa: F401
from .config import DEFAULT_TARGET_MODULES, AdapterError, LoraConfig  # noqa: F401
from .ia3 import IA3Config  # noqa: F401
from .io import get_peft_model_state_dict  # noqa: F401
from .layer import LoraLinear, ModulesToSaveWrapper  # noqa: F401
from .model import LoraModel, PeftModel, get_peft_model  # noqa: F401
from .plus import create_loraplus_optimizer  # noqa: F401

__all__ = ["LoraConfig", "AdapterError", "DEFAULT_TARGET_MODULES", "LoraLinear", "ModulesToSaveWrapper", "LoraModel",
           "PeftModel", "get_peft_model", "add_weighted_adapter", "get_peft_model_state_dict", "merge", "init", "dora",
           "create_loraplus_optimizer", "IA3Config"]
