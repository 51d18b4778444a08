"""LoRA (Hu et al., 2021): frozen base weights plus trainable low-rank updates ΔW = (α/r)·B·A.

PEFT's API and file format (Hugging Face PEFT 0.21: its documentation and source), from scratch:

- ``LoraConfig``: r, lora_alpha, target_modules, lora_dropout, bias, use_rslora, init_lora_weights, ...
- ``get_peft_model(model, config)`` -> ``PeftModel``: inject, freeze, merge, switch, save, load.
- ``LoraLinear``: the layer, h = W0·x + (α/r)·B·(A·x), with A: (r, in) and B: (out, r).
- ``fused``: the same layer as one autograd op (``lora_linear``), its fast twin.
- ``merge``: the formula one step at a time (scaling, delta weight, merge, unmerge, trace).
- ``add_weighted_adapter``: combine adapters ("cat" exact, "svd" / "linear" approximate).
"""
from . import merge  # noqa: F401
from .combine import add_weighted_adapter  # noqa: F401
from .config import DEFAULT_TARGET_MODULES, AdapterError, LoraConfig  # noqa: F401
from .io import get_peft_model_state_dict  # noqa: F401
from .layer import LoraLinear, ModulesToSaveWrapper  # noqa: F401
from .model import LoraModel, PeftModel, get_peft_model  # noqa: F401

__all__ = ["LoraConfig", "AdapterError", "DEFAULT_TARGET_MODULES", "LoraLinear", "ModulesToSaveWrapper", "LoraModel",
           "PeftModel", "get_peft_model", "add_weighted_adapter", "get_peft_model_state_dict", "merge"]
