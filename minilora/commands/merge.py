"""``minilora merge --adapter DIR --out DIR [--base DIR]``: fold a LoRA adapter into its base model.

The merged checkpoint (config.json + model.safetensors, Hugging Face's Llama format) holds
W = W0 + (α/r)·B·A in every adapted layer, so it runs with no LoRA code and no extra inference cost.
The work is done by ``minilora.commands.finetune.merge_adapter_into_base``; this module is the command.
"""
from .finetune import add_merge_arguments as add_arguments  # noqa: F401
from .finetune import run_merge as run  # noqa: F401
