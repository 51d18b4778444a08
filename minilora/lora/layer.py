"""The LoRA layer: a frozen Linear plus a trainable low-rank side path, h = W0·x + (α/r)·B·(A·x).

Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models", section 4.1. A pretrained
weight W0 (out_features, in_features) stays frozen; the adapter learns A (r, in_features) and
B (out_features, r), with r much smaller than either dimension.

``LoraLinear.forward`` is the reference: the equation written with modules, PEFT's form,
``result = base_layer(x)`` then ``result = result + lora_B(lora_A(dropout(x))) * scaling`` for each
active adapter. It never forms the (out, in) product B·A: x is squeezed to r numbers by A and
expanded again by B, which costs r·(in + out) multiply-adds per token instead of in·out.

Its fast twin is ``lora/fused.py`` (``lora_linear``): the same equation as one autograd node, which
keeps fewer activation arrays and, for a training batch, DOES form W0 + B·A because one GEMM with
the merged weight is then cheaper; that module's docstring says what each buys. ``forward`` calls it
when one adapter is active on a plain or 4-bit Linear, outside ``minilora.reference()``; both take
the scale from ``scaling[name]``, the one number ``lora.merge.scaling`` computed for the adapter.

Shapes and names follow PEFT's ``LoraLayer``, so that parameter names in memory read
``...q_proj.base_layer.weight``, ``...q_proj.lora_A.default.weight``, ``...q_proj.lora_B.default.weight``:

* ``base_layer``: the original Linear, its weight frozen (``requires_grad=False``), so autograd never
  computes dL/dW0: the matmul that would produce it is skipped (autograd.py), and no optimizer state
  exists for it;
* ``lora_A[name]``: Linear(in_features -> r), weight (r, in_features);
* ``lora_B[name]``: Linear(r -> out_features), weight (out_features, r);
* several named adapters can live side by side; ``active_adapters`` says which ones run.

Merging folds ΔW = scaling·B·A into W0 so that inference costs nothing extra; unmerging subtracts
it. Both call ``lora/merge.py`` (the one place the formula is written).

DoRA (Liu et al. 2024; ``update_layer(..., use_dora=True)``) adds ``lora_magnitude_vector[name]``, a
trainable (out_features,) Parameter m, and computes W' = m · (W0 + ΔW) / ‖W0 + ΔW‖ (the norm per
output row, detached); its math, forward term, merge and unmerge are ``lora/dora.py``. A DoRA
adapter always runs in module form (never the fused op).

Also here: ``ModulesToSaveWrapper`` (PEFT's way of training a whole module, e.g. ``lm_head``, next to
the adapters) and ``ModuleDict`` (named submodules that never collide with method names).
"""
from __future__ import annotations

import copy

from .. import backend, settings
from .. import functional as F
from ..nn import Linear, Module, Parameter, init_normal
from ..tensor import Tensor
from . import dora
from . import init as lora_init
from . import merge as merge_math
from . import mixed
from .fused import lora_linear


class _NamedEntries(Module):
    """Entries by name, kept in one of Module's registries (``_store``) and never as attributes, so
    an adapter may be called "train" or "forward" without hiding a method."""

    _store = "_modules"
    _kind = Module

    def _entries(self):
        return self.__dict__[self._store]

    def __getitem__(self, key: str):
        return self._entries()[key]

    def __setitem__(self, key: str, value) -> None:
        if not isinstance(value, self._kind):
            raise TypeError(f"{type(self).__name__} values must be {self._kind.__name__}s, got "
                            f"{type(value).__name__}")
        self._entries()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._entries()[key]

    def __contains__(self, key) -> bool:
        return key in self._entries()

    def __iter__(self):
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())

    def keys(self):
        return self._entries().keys()

    def items(self):
        return self._entries().items()

    def values(self):
        return self._entries().values()


class ModuleDict(_NamedEntries):
    """Submodules by name (``lora_A["default"]``), registered so their parameters get dotted names
    (``lora_A.default.weight``)."""


class ParameterDict(_NamedEntries):
    """Parameters by name (``lora_magnitude_vector["default"]``), as ``torch.nn.ParameterDict``: each
    entry is named ``<dict>.<key>`` in ``named_parameters()``."""

    _store = "_parameters"
    _kind = Parameter


def is_linear_like(module) -> bool:
    """Can LoRA wrap this module? ``nn.Linear``, or any module that declares ``lora_targetable = True``
    and has ``in_features`` / ``out_features`` (a frozen quantized Linear, for example)."""
    if isinstance(module, (LoraLinear, ModulesToSaveWrapper)):
        return False
    if isinstance(module, Linear):
        return True
    return bool(getattr(type(module), "lora_targetable", False)) and \
        hasattr(module, "in_features") and hasattr(module, "out_features")


def is_quantized_base(module) -> bool:
    """Is ``module`` a quantized frozen Linear (QLoRA's 4-bit base, ``quant.NF4Linear``)?

    LoRA uses only these methods of it (duck-typed: lora/ knows nothing of quant/'s internals):
    ``dequantized_weight()`` -> float (out, in) array (a copy), ``replace_weight(W)`` -> store W
    re-quantized and return the error that rounding added, ``to_linear()`` -> a float ``Linear``,
    and ``transient_weight()`` -> a frozen weight handle whose ``dequantize()`` call gives W (the
    fused op's way to read W0 without a lasting float copy).
    """
    return callable(getattr(module, "dequantized_weight", None)) and \
        callable(getattr(module, "replace_weight", None))


class LoraLinear(Module):
    """A frozen base Linear with LoRA adapters: ``base_layer(x) + Σ lora_B(lora_A(dropout(x))) · scaling``.

    Convention (PEFT's and the paper's): ``lora_A[name].weight`` is (r, in_features) and
    ``lora_B[name].weight`` is (out_features, r); ΔW = scaling · B @ A has the shape of W0,
    (out_features, in_features). ``scaling[name]`` is α/r (α/√r with rsLoRA), set once by
    ``update_layer``; forward, the fused op and merging all read it from there.

    ``forward`` is the equation written with modules. Outside ``minilora.reference()``, when one
    adapter is active on a plain or 4-bit Linear, it runs the same equation as one fused autograd
    op (``lora/fused.py``), which keeps 3 fewer activation arrays per layer and may use the merged
    weight (tests/test_lora_layer.py checks both give the same numbers).
    """

    def __init__(self, base_layer: Module, module_name: str = ""):
        super().__init__()
        if not is_linear_like(base_layer):
            raise ValueError(f"LoRA can only wrap Linear layers, got {type(base_layer).__name__}"
                             f"{' at ' + module_name if module_name else ''}")
        self.base_layer = base_layer
        self.lora_A = ModuleDict()
        self.lora_B = ModuleDict()
        self.lora_magnitude_vector = ParameterDict()   # DoRA's m, (out_features,), per DoRA adapter
        # per-adapter hyperparameters (plain dicts: they are not parameters)
        self.r: dict = {}
        self.lora_alpha: dict = {}
        self.use_rslora: dict = {}
        self.scaling: dict = {}
        self.lora_dropout: dict = {}
        self.use_dora: dict = {}
        self._dora_norm: dict = {}          # DoRA: the norm a merge used, kept for its unmerge
        self.active_adapters: list = []
        self.merged_adapters: list = []     # in the order they were merged (unmerge reverses it)
        self.disable_adapters = False
        self.module_name = module_name      # the dotted name in the model, for error messages
        self.requantization_error = None     # a 4-bit base: the error of the last re-quantization
        for p in base_layer.parameters():
            p.requires_grad = False          # frozen: backward will never compute dL/dW0

    # ------------------------------------------------------------------ shape
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self):
        """The base layer's weight W0 (merged with any merged adapters)."""
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights=True, use_rslora: bool = False, use_dora: bool = False,
                     loftq_config=None) -> None:
        """Add an adapter called ``adapter_name`` with rank ``r``: A (r, in), B (out, r).

        ``init_lora_weights``: True = A ~ U(-1/√in, 1/√in) (nn.Linear's default, PEFT's
        kaiming_uniform(a=√5)) and B = 0, so ΔW = 0 and the layer's output is unchanged, bit for bit;
        "gaussian" = A ~ N(0, (1/r)²), B = 0; False = A and B both random (ΔW ≠ 0, for tests);
        "pissa", "pissa_niter_K", "olora", "loftq" (with ``loftq_config``): A and B from W0, and the
        base weight REPLACED by the residual (LoftQ: by its NF4 values): ``lora/init.py``.

        ``use_dora``: also a magnitude m = ‖W0 + ΔW‖ per output row (``lora_magnitude_vector``,
        trainable), computed after A and B are set, so that a fresh DoRA adapter computes what the
        LoRA adapter alone would (the base's output, with B = 0), up to float rounding.
        """
        if adapter_name in self.lora_A:
            raise ValueError(f"{self.module_name or 'this layer'} already has an adapter called "
                             f"{adapter_name!r}; pick another name or delete_adapter() it first")
        scale = merge_math.scaling(lora_alpha, r, use_rslora)  # validates r and alpha
        A = Linear(self.in_features, r, bias=False)   # weight (r, in): U(-1/√in, 1/√in)
        B = Linear(r, self.out_features, bias=False)  # weight (out, r)
        if init_lora_weights == "gaussian":
            A.weight.data = backend.to_device(init_normal((r, self.in_features), 1.0 / r))
        if init_lora_weights is True or init_lora_weights == "gaussian":
            B.weight.data = backend.xp().zeros_like(B.weight.data)  # B = 0  =>  ΔW = B·A = 0
        elif isinstance(init_lora_weights, str):   # PiSSA, OLoRA, LoftQ: read and change W0
            A.weight.data, B.weight.data = lora_init.init_from_base(
                self.base_layer, is_quantized_base(self.base_layer), init_lora_weights, r, scale,
                loftq_config, where=self.module_name)
        # The factors live on the base weight's device, in its dtype when that is float32/float64
        # (float64 bases are used for gradient checks); a low-precision or quantized base keeps
        # float32 factors, as PEFT trains them.
        base_w = getattr(self.base_layer, "weight", None)
        if isinstance(base_w, Parameter):
            dev = backend.device_of(base_w.data)
            wide = base_w.data.dtype.kind == "f" and base_w.data.dtype.itemsize >= 4
            for lin in (A, B):
                arr = backend.to_device(lin.weight.data, dev)
                lin.weight.data = arr.astype(base_w.data.dtype) if wide else arr
        self.lora_A[adapter_name] = A
        self.lora_B[adapter_name] = B
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.scaling[adapter_name] = scale
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.use_dora[adapter_name] = bool(use_dora)
        if use_dora:   # PEFT's DoraLinearLayer.update_layer: m starts as the norm of W0 + ΔW
            norm = dora.weight_norm(self._base_weight_array(), A.weight.data, B.weight.data, scale)
            self.lora_magnitude_vector[adapter_name] = Parameter(norm.astype(A.weight.data.dtype))

    def set_adapter(self, adapter_names) -> None:
        """Make these adapters the ones that run in forward (a name or a list of names)."""
        self.active_adapters = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into {self.module_name}; "
                             "unmerge_adapter() before deleting it")
        for d in (self.r, self.lora_alpha, self.use_rslora, self.scaling, self.lora_dropout,
                  self.use_dora, self._dora_norm):
            d.pop(adapter_name, None)
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if adapter_name in self.lora_A:
            del self.lora_A[adapter_name]
            del self.lora_B[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    # ------------------------------------------------------------------ forward
    def forward(self, x):
        """h = W0·x + Σ_active scaling·B·(A·dropout(x)); only W0·x when merged or disabled.

        A DoRA adapter adds ``_dora_forward``'s term instead of its LoRA term."""
        names = mixed.row_adapters(self)
        if names is not None:  # a mixed batch: row i runs adapter names[i] (lora/mixed.py)
            return mixed.lora_forward(self, x, names)
        if self.disable_adapters:
            if self.merged:  # the base weight holds ΔW: take it out so "disabled" means the base
                self.unmerge()
            return self.base_layer(x)
        if self.merged:      # W0 already contains ΔW: running the side path would add it twice
            return self.base_layer(x)
        active = [name for name in self.active_adapters if name in self.lora_A]
        if not settings.reference_mode() and self._fusable(active):
            return self._fused_forward(x, active[0])
        result = self.base_layer(x)                                    # (..., out)
        for name in active:
            if self.use_dora.get(name, False):
                result = result + self._dora_forward(x, result, name)      # (..., out)
                continue
            lora_A, lora_B, scaling = self.lora_A[name], self.lora_B[name], self.scaling[name]
            dropped = F.dropout(x, self.lora_dropout[name], self.training)    # (..., in)
            result = result + lora_B(lora_A(dropped)) * scaling   # (..., in) -> (..., r) -> (..., out)
        return result

    def _fusable(self, active) -> bool:
        """Can the fused op run this forward? One active LoRA (not DoRA) adapter on a plain or 4-bit
        Linear (the op knows those two weights; a Linear subclass may compute something else)."""
        base = self.base_layer
        return len(active) == 1 and not self.use_dora.get(active[0], False) and \
            (type(base) is Linear or is_quantized_base(base))

    def _base_weight_array(self):
        """W0 (out, in) as a float array: a float base's weight itself, or a 4-bit base's
        dequant(W0), a new float32 copy (PEFT's ``dequantize_module_weight``)."""
        if is_quantized_base(self.base_layer):
            return self.base_layer.dequantized_weight()
        return self.base_layer.weight.data

    def _dora_forward(self, x, result, name: str):
        """What DoRA adapter ``name`` adds to ``result`` (PEFT's ``DoraLinearVariant.forward``):
        (f − 1)·W0·x + f·s·B·(A·x), f = m / ‖W0 + s·B·A‖ (``lora/dora.py``).

        The norm is computed from the current A and B as a plain array: detached (the paper's
        section 4.3; ``lora/dora.py`` says why). Without dropout W0·x is read off ``result`` (the
        output so far, bias removed: with several active adapters PEFT uses the running sum here,
        which is what its merge computes too); with dropout in training x is dropped first and
        W0·x recomputed from the dropped x, as PEFT does, so both terms see the same input.
        """
        W0 = self._base_weight_array()                                  # (out, in)
        A, B, scale = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        norm = dora.weight_norm(W0, A.data, B.data, scale)              # (out,), a constant
        p = self.lora_dropout[name]
        if p > 0.0 and self.training:
            x = F.dropout(x, p, True)                                   # (..., in)
            base_result = None
        else:
            bias = getattr(self.base_layer, "bias", None)
            base_result = result - bias if bias is not None else result   # (..., out)
        # a float base hands its Parameter (frozen, in the graph as PEFT's is); a 4-bit base the
        # dequantized array, a constant
        weight = W0 if is_quantized_base(self.base_layer) else self.base_layer.weight
        return dora.dora_forward(x, weight, A, B, self.lora_magnitude_vector[name], scale, norm,
                                 base_result)

    def _fused_forward(self, x, name: str):
        """The fast twin of ``forward`` (``lora/fused.py``), with this adapter's ``scaling[name]``.
        A 4-bit base hands over a handle the op dequantizes when it needs W0 (forward, backward)."""
        base = self.base_layer
        weight = base.weight if type(base) is Linear else base.transient_weight()
        return lora_linear(x, weight, base.bias, self.lora_A[name].weight,
                           self.lora_B[name].weight, self.scaling[name],
                           self.lora_dropout[name], self.training)

    # ------------------------------------------------------------------ merging
    def _mergeable_weight(self):
        """The base weight to merge into: the Parameter itself, or for a quantized base a float32
        Tensor holding dequant(W0), written back by ``_store_weight``."""
        if is_quantized_base(self.base_layer):
            return Tensor(self.base_layer.dequantized_weight())
        return self._check_mergeable()

    def _store_weight(self, w) -> None:
        """After merging: a quantized base re-quantizes the float result (as PEFT does on
        bitsandbytes layers), which rounds it again; the error is kept in ``requantization_error``.
        A float base was updated in place already."""
        if is_quantized_base(self.base_layer):
            self.requantization_error = self.base_layer.replace_weight(w.data)

    def dequantize_base(self) -> None:
        """Swap a quantized base for a float ``Linear`` holding dequant(W0) (nothing to do for a
        float base), so that merging adds ΔW in float32 with no second rounding."""
        if is_quantized_base(self.base_layer):
            self.base_layer = self.base_layer.to_linear()

    def _check_mergeable(self):
        w = getattr(self.base_layer, "weight", None)
        if not isinstance(w, Parameter) or w.data.dtype.kind != "f":
            raise ValueError(f"cannot merge into {self.module_name or type(self.base_layer).__name__}:"
                             " its base weight is not a float array (a quantized base?); dequantize "
                             "it first or keep the adapter unmerged")
        return w

    def get_delta_weight(self, adapter_name: str):
        """ΔW = scaling[adapter_name] · B @ A for one adapter: an (out_features, in_features) array."""
        if adapter_name not in self.lora_A:
            raise ValueError(f"{self.module_name or 'this layer'} has no adapter {adapter_name!r}; "
                             f"it has {list(self.lora_A)}")
        return merge_math.delta_weight_scaled(self.lora_A[adapter_name].weight.data,   # (r, in)
                                              self.lora_B[adapter_name].weight.data,   # (out, r)
                                              self.scaling[adapter_name],
                                              name=f"{self.module_name} ({adapter_name})")

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        """W0 += ΔW for each adapter (default: the active ones) not merged yet.

        ``safe_merge`` computes the merged weight on a copy and refuses (ValueError) when it has
        NaN/Inf, leaving W0 untouched. A quantized (4-bit) base is dequantized, merged in float32
        and re-quantized: see ``_store_weight``. A DoRA adapter makes W = f·(W + ΔW), f = m / ‖W0 +
        ΔW‖ per row (``dora.merged_weight``), the norm taken on the weight with the adapters merged
        before it taken out, as PEFT does, and kept for ``unmerge``.
        """
        names = self.active_adapters if adapter_names is None else \
            ([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        w = None
        try:
            for name in names:
                if name not in self.lora_A or name in self.merged_adapters:
                    continue
                if w is None:
                    w = self._mergeable_weight()
                w.data = self._merge_one(w.data, name, safe_merge)
                self.merged_adapters.append(name)
        finally:
            if w is not None:
                self._store_weight(w)

    def _merge_one(self, W, name: str, safe_merge: bool = False):
        """W with adapter ``name`` merged in, a new array (W untouched): W + ΔW, or for DoRA
        f·(W + ΔW) with the norm of the unmerged weight, which is kept in ``_dora_norm[name]``."""
        A, B, scale = self.lora_A[name].weight.data, self.lora_B[name].weight.data, self.scaling[name]
        where = f"{self.module_name} ({name})"
        if not self.use_dora.get(name, False):
            return merge_math.merge_weight_scaled(W, A, B, scale, safe_merge=safe_merge, name=where)
        norm = dora.weight_norm(self._without_merged(W), A, B, scale)         # (out,)
        merged = dora.merged_weight(W, A, B, scale, self.lora_magnitude_vector[name].data, norm)
        if safe_merge and not bool(backend.get_xp(merged).isfinite(merged).all()):
            raise ValueError(f"safe_merge refused in {where}: the merged DoRA weight has NaN/Inf "
                             "entries; check lora_A/lora_B/lora_magnitude_vector for NaN/Inf")
        self._dora_norm[name] = norm
        return merged

    def _unmerge_one(self, W, name: str):
        """The inverse of ``_merge_one``: W − ΔW, or for DoRA W / f − ΔW with the kept norm."""
        A, B, scale = self.lora_A[name].weight.data, self.lora_B[name].weight.data, self.scaling[name]
        if not self.use_dora.get(name, False):
            return merge_math.unmerge_weight_scaled(W, A, B, scale, name=f"{self.module_name} ({name})")
        return dora.unmerged_weight(W, A, B, scale, self.lora_magnitude_vector[name].data,
                                    self._dora_norm[name])

    def _without_merged(self, W):
        """W with every merged adapter taken out again, last merged first (a new array): the base
        weight as ``forward`` sees it (PEFT's ``_unmerged_base_weight``)."""
        for name in reversed(self.merged_adapters):
            W = self._unmerge_one(W, name)
        return W

    def unmerge(self) -> None:
        """W0 -= ΔW for every merged adapter, last merged first (exact up to float rounding; a 4-bit
        base is re-quantized, so it comes back only to within NF4 rounding, as in PEFT). A DoRA
        adapter divides its factor f out first, with the norm its merge kept."""
        if not self.merged_adapters:
            return
        w = self._mergeable_weight()
        try:
            while self.merged_adapters:
                name = self.merged_adapters[-1]
                w.data = self._unmerge_one(w.data, name)
                self.merged_adapters.pop()
                self._dora_norm.pop(name, None)
        finally:
            self._store_weight(w)

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]}"
                 f"{', dora' if self.use_dora.get(n) else ''}" for n in self.lora_A]
        state = ", merged" if self.merged else ""
        return f"adapters=[{'; '.join(parts)}]{state}"


class ModulesToSaveWrapper(Module):
    """A module trained in full next to the adapters (PEFT's ``modules_to_save``, e.g. ``lm_head``).

    ``original_module`` stays frozen; ``modules_to_save[name]`` is a trainable copy per adapter, used
    when that adapter is active. Names in memory: ``lm_head.original_module.weight`` and
    ``lm_head.modules_to_save.default.weight``; in the adapter file: ``lm_head.weight``.
    """

    def __init__(self, module: Module, module_name: str = ""):
        super().__init__()
        self.original_module = module
        self.modules_to_save = ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.module_name = module_name
        module.requires_grad_(False)

    def update(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            raise ValueError(f"{self.module_name} already has a trainable copy for {adapter_name!r}")
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def set_adapter(self, adapter_name) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self.active_adapter = next((n for n in names if n in self.modules_to_save), None)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def active_module(self) -> Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        names = mixed.row_adapters(self)
        if names is not None:  # a mixed batch: row i runs adapter names[i]'s copy (lora/mixed.py)
            return mixed.modules_to_save_forward(self, names, *args, **kwargs)
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name):
        # attributes the model may read from the wrapped module (weight, in_features, ...)
        if name.startswith("_") or "_modules" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.active_module(), name)
