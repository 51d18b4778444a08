"""Module and Parameter: the containers that hold weights, as in torch.nn.

A Module finds its parameters and submodules by looking at its attributes (in the order they were
set), so ``named_parameters()`` yields dotted names like ``model.layers.0.self_attn.q_proj.weight``,
exactly Hugging Face's, and ``state_dict()`` / ``load_state_dict()`` move weights by those names.
``set_submodule("a.b.c", new)`` replaces one module by its dotted name: that is how LoRA layers are
injected from the outside, without the model knowing about LoRA.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import backend
from ..tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer may train (requires_grad=True by default)."""

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"


class Module:
    """Base class: subclasses set Parameters and Modules as attributes and define ``forward``."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        params = self.__dict__.get("_parameters")
        if params is None:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                                 f"before setting {name!r}")
        # Assigning to an existing key keeps its place (as in torch), so replacing a submodule
        # (a Linear by its LoRA wrapper) leaves the order of named_parameters() unchanged.
        if isinstance(value, Parameter):
            self._modules.pop(name, None)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._parameters.pop(name, None)
            self._modules[name] = value
        else:
            self._parameters.pop(name, None)
            self._modules.pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} defines no forward()")

    # ------------------------------------------------------------------ traversal
    def named_modules(self, prefix: str = ""):
        """(dotted name, module) for this module and every descendant, depth first."""
        yield prefix, self
        for name, mod in self._modules.items():
            yield from mod.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_children(self):
        yield from self._modules.items()

    def named_parameters(self, prefix: str = ""):
        """(dotted name, Parameter) for every parameter, each shared one once."""
        seen = set()
        for mod_name, mod in self.named_modules(prefix):
            for name, p in mod._parameters.items():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def get_submodule(self, target: str) -> "Module":
        mod = self
        for part in target.split(".") if target else []:
            if part not in mod._modules:
                raise AttributeError(f"{type(mod).__name__} has no submodule {part!r} "
                                     f"(looking up {target!r})")
            mod = mod._modules[part]
        return mod

    def set_submodule(self, target: str, module: "Module") -> None:
        """Replace the submodule at dotted path ``target`` (e.g. a Linear by its LoRA wrapper)."""
        parent_name, _, child = target.rpartition(".")
        parent = self.get_submodule(parent_name)
        if child not in parent._modules:
            raise AttributeError(f"{target!r} is not a submodule of {type(self).__name__}")
        setattr(parent, child, module)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> "OrderedDict[str, object]":
        """Dotted name -> array (the live arrays, not copies, as torch does)."""
        return OrderedDict((n, p.data) for n, p in self.named_parameters())

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy arrays into the parameters by name. ``strict`` refuses missing or unexpected keys.

        Returns (missing_keys, unexpected_keys). A shape mismatch is always an error.
        """
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
            raise KeyError(f"load_state_dict: {'; '.join(parts)}; the checkpoint does not match this "
                           "model (or pass strict=False to load what matches)")
        for name, p in own.items():
            if name not in state_dict:
                continue
            value = state_dict[name]
            value = value.data if isinstance(value, Tensor) else value
            if tuple(value.shape) != p.shape:
                raise ValueError(f"load_state_dict: {name} has shape {tuple(value.shape)} in the "
                                 f"checkpoint but {p.shape} in the model; check the config")
            xpmod = backend.get_xp(p.data)
            p.data = xpmod.asarray(backend.to_device(value, backend.device_of(p.data)),
                                   dtype=p.data.dtype)
        return missing, unexpected

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def requires_grad_(self, flag: bool = True) -> "Module":
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, device: str) -> "Module":
        """Move every parameter's array to "cpu" or "cuda", in place."""
        for p in self.parameters():
            p.data = backend.to_device(p.data, device)
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        return int(sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only))

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, mod in self._modules.items():
            sub = repr(mod).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return "\n".join(lines) + (")" if len(lines) == 1 else "\n)")


class ModuleList(Module):
    """A list of modules whose parameters are named by index: ``layers.0.``, ``layers.1.``, ..."""

    def __init__(self, modules=()):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __getitem__(self, i: int) -> Module:
        return self._modules[str(i % len(self))]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def append(self, m: Module) -> None:
        setattr(self, str(len(self)), m)


def init_normal(shape, std: float) -> np.ndarray:
    """N(0, std^2) weights drawn from minilora's seeded host generator, as float32/64 default."""
    return (backend.rng().standard_normal(shape) * std).astype(backend.default_float())


def init_uniform(shape, bound: float) -> np.ndarray:
    """U(-bound, bound) weights from minilora's seeded host generator."""
    return backend.rng().uniform(-bound, bound, size=shape).astype(backend.default_float())
