"""minilora: LoRA and QLoRA built from scratch in NumPy (and CuPy), to learn from.

Layers, bottom up (see DESIGN.md): backend -> tensor/ops -> functional/testing -> nn/optim/data ->
models -> lora/quant -> train/memory/article -> cli.
"""
__version__ = "0.1.0"

from . import backend  # noqa: F401
from .tensor import Tensor, no_grad, is_grad_enabled  # noqa: F401
from . import ops  # noqa: F401  (binds the Tensor operators)
from . import functional  # noqa: F401
from .backend import manual_seed, set_device, get_device  # noqa: F401
