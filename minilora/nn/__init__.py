"""Modules: containers of parameters (``Module``), and the layers a Llama needs."""
from .module import Module, ModuleList, Parameter, init_normal, init_uniform  # noqa: F401
from .layers import Embedding, Linear, RMSNorm  # noqa: F401
