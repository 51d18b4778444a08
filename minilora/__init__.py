"""minilora: LoRA and QLoRA built from scratch in NumPy (and CuPy), to learn from.

Layers, bottom up; a module imports from its own layer and those below (docs/architecture.md):

0. backend, settings, fileio, gguf: the array library, switches and constants, files
1. autograd, tensor, ops: the graph and ``backward()``, Tensor, the primitive ops
2. fast/: the fast twins (CPU threads, CUDA kernels, fused ops, AdamW in cache pieces)
3. functional, testing: the reference composites; gradcheck
4. nn/, optim, data/: modules, optimizers, tokenizers and data sets
5. models/: LlamaConfig, LlamaForCausalLM, checkpoints
6. lora/, quant/, paged_optim: the adapters, the 4-bit base, paged AdamW
7. train, data_parallel, memory: the training loop, micro-batches on threads, accounting
8. teaching/: the article check and the exercises
9. commands/: the bodies of demo, pretrain, finetune, merge
10. cli, __main__, this package: the ``minilora`` command and these exports

Importing minilora changes nothing outside it (no process-wide settings): ``reference()`` runs the
plain reference path inside a ``with`` block, ``backend.keep_freed_host_memory()`` is opt-in.
"""
__version__ = "0.1.0"

from . import backend  # noqa: F401
from .tensor import Tensor, no_grad, is_grad_enabled  # noqa: F401
from . import ops  # noqa: F401  (the primitives behind Tensor's operators, as minilora.ops)
from . import functional  # noqa: F401
from .backend import manual_seed, set_device, get_device  # noqa: F401
from .settings import reference  # noqa: F401
