"""The basic layers: Linear, Embedding, RMSNorm (PyTorch's names, shapes and defaults)."""
from __future__ import annotations

import math

from .. import backend
from .. import functional as F
from .module import Module, Parameter, init_normal, init_uniform


class Linear(Module):
    """y = x W^T (+ b) with W of shape (out_features, in_features), as torch.nn.Linear.

    Default init is PyTorch's: U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a=sqrt(5)).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(backend.to_device(init_uniform((out_features, in_features), bound)))
        self.bias = Parameter(backend.to_device(init_uniform((out_features,), bound))) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


class Embedding(Module):
    """A (num_embeddings, embedding_dim) table; forward looks up rows by integer id."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float = 1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(backend.to_device(init_normal((num_embeddings, embedding_dim), std)))

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class RMSNorm(Module):
    """Root-mean-square layer norm with a learned scale, initialised to ones (Llama's norm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(backend.xp().ones(hidden_size, dtype=backend.default_float()))

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
