"""(IA)³: a frozen model whose chosen activations are rescaled by learned vectors, h = (W0·x)·l.

Liu et al. (2022), "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", section 3.3: "Infused Adapter by Inhibiting and Amplifying Inner Activations". Instead of
adding a low-rank ΔW (LoRA), (IA)³ multiplies activations element-wise by a learned vector l that
starts at ones, so a fresh adapter computes exactly what the base computes:

* an attention projection (keys, values): the *output* is scaled, h = (W0·x) ⊙ l, with l of shape
  (out_features, 1) (PEFT's); folded into the weight this is W = diag(l)·W0, the rows of W0 scaled;
* a feed-forward projection (``feedforward_modules``, Llama's ``down_proj``): the *input* is scaled,
  h = W0·(x ⊙ l), with l of shape (1, in_features); folded in, W = W0·diag(l), the columns scaled.

Both shapes broadcast against W0 (out, in), so one product ``W0 * l`` merges either kind
(``ia3_merged_weight``). An adapter trains one number per output (or input) feature: a few
thousand for a whole model.

The names and files follow Hugging Face PEFT 0.21's ``IA3Config``, ``IA3Model`` and ``ia3.Linear``:
in memory ``...k_proj.base_layer.weight`` and ``...k_proj.ia3_l.default``, in the adapter file
``base_model.model.model.layers.0.self_attn.k_proj.ia3_l`` (``lora/io.py`` writes and reads them),
``adapter_config.json`` with ``"peft_type": "IA3"``. ``PeftModel`` (``lora/model.py``) holds an
``IA3Model`` as its ``base_model`` when given an ``IA3Config``; LoRA and (IA)³ adapters never share
a model (PEFT refuses the mix too).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np

from .. import backend
from ..nn import Module, Parameter, init_normal
from ..tensor import Tensor
from .config import MAX_CONFIG_BYTES, AdapterError, LoraConfig, _normalise_targets, _user_match, matches
from .layer import LoraLinear, ParameterDict, is_linear_like
from .targets import _output_head_names, modules_to_save_names, plan_injection
from .targets import _plain_modules as _lora_plain_modules

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING for
# "llama": the keys and values of attention, and the MLP's output projection (the paper's choice for
# T0: rescale keys, values and the feed-forward's inner activation).
IA3_DEFAULT_TARGET_MODULES = ["k_proj", "v_proj", "down_proj"]
IA3_DEFAULT_FEEDFORWARD_MODULES = ["down_proj"]

# Keys PEFT writes that carry no meaning for the weights; read and dropped (as LoraConfig does).
_INFORMATIONAL = {"auto_mapping": None, "peft_version": None}


@dataclass
class IA3Config:
    """The settings of one (IA)³ adapter, with the names, meanings and JSON of PEFT's ``IA3Config``.

    ``target_modules``: module names matched as suffixes, a regex matching the whole dotted name,
    "all-linear", or None (Llama's: k_proj, v_proj, down_proj); ``feedforward_modules``: which of
    them scale their input instead of their output (a list must be a subset of a list
    ``target_modules``; None = Llama's down_proj); ``exclude_modules``: names (or a regex) never
    adapted; ``modules_to_save``: whole modules trained and saved beside the vectors;
    ``init_ia3_weights``: True = vectors of ones (the adapted model starts as the base), False =
    N(0, 1) vectors (for tests only, as in PEFT). ``fan_in_fan_out`` exists for GPT-2's Conv1D,
    which minilora has not: only False is accepted.
    """

    target_modules: list | str | None = None
    exclude_modules: list | str | None = None
    feedforward_modules: list | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list | None = None
    init_ia3_weights: bool = True
    task_type: str | None = "CAUSAL_LM"
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_type: str = "IA3"

    def __post_init__(self):
        if self.peft_type != "IA3":
            raise ValueError(f"IA3Config: peft_type={self.peft_type!r}; an IA3Config holds peft_type "
                             "'IA3' (use LoraConfig for 'LORA')")
        for name in ("fan_in_fan_out", "init_ia3_weights", "inference_mode"):
            if not isinstance(getattr(self, name), bool):   # JSON "false" is a truthy string
                raise ValueError(f"IA3Config: {name} is {getattr(self, name)!r}; expected true or false")
        if self.fan_in_fan_out:
            raise ValueError("IA3Config: fan_in_fan_out=True is for GPT-2's Conv1D weights (in, out); "
                             "minilora's Linear stores (out, in): use fan_in_fan_out=False")
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if name != "target_modules" and isinstance(value, (list, tuple, set)) and not value:
                value = []        # PEFT accepts an empty set: no feed-forward module, none excluded
            elif value is not None:       # "all-linear" passes through unchanged
                try:   # config.py's check, whose messages name LoraConfig's field
                    value = _normalise_targets(value)
                except ValueError as e:
                    raise ValueError(str(e).replace("LoraConfig: target_modules",
                                                    f"IA3Config: {name}")) from None
            setattr(self, name, value)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None and not all(isinstance(m, str) and m
                                                        for m in self.modules_to_save):
            raise ValueError(f"IA3Config: modules_to_save must be a list of module names, got "
                             f"{self.modules_to_save!r}")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise ValueError(f"IA3Config: feedforward_modules {sorted(set(ff) - set(targets))} are not "
                             "in target_modules; feedforward_modules must be a subset of target_modules")
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ValueError(f"IA3Config: task_type={self.task_type!r}; minilora's models are causal "
                             "language models: use 'CAUSAL_LM' (or None)")

    # ------------------------------------------------------------------ JSON (PEFT's keys and types)
    def to_dict(self) -> dict:
        """The adapter_config.json contents: PEFT's keys, lists sorted (PEFT keeps sets)."""
        d = dataclasses.asdict(self)
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            if isinstance(d[name], list):
                d[name] = sorted(d[name])
        d["auto_mapping"] = None
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d: dict) -> "IA3Config":
        """Read an adapter_config.json dict (PEFT's or ours); refuse keys minilora does not know."""
        if not isinstance(d, dict):
            raise ValueError(f"adapter config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in _INFORMATIONAL)
        if unknown:
            raise ValueError(f"adapter config with peft_type 'IA3' has keys an (IA)³ config does not "
                             f"have: {unknown}; it may come from a newer PEFT or another method: remove "
                             "them if they are off/default")
        return cls(**{k: v for k, v in d.items() if k in names})

    to_json_string = LoraConfig.to_json_string                 # json of to_dict(), as LoRA's
    from_json_file = LoraConfig.__dict__["from_json_file"]     # the same checked read, cls = IA3Config


def adapter_config_class(path):
    """The class that reads the adapter config at ``path``: IA3Config when its ``peft_type`` is
    "IA3", LoraConfig when it is "LORA" or absent (a file that cannot be read at all is left to
    LoraConfig.from_json_file, which reports why); any other type is a one-line AdapterError."""
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            return LoraConfig
        with open(path, "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return LoraConfig
    peft_type = d.get("peft_type", "LORA") if isinstance(d, dict) else "LORA"
    if peft_type == "IA3":
        return IA3Config
    if peft_type != "LORA":
        raise AdapterError(f"{path} has peft_type {peft_type!r}; minilora loads 'LORA' and 'IA3' "
                           "adapters: train the adapter with one of those")
    return LoraConfig


# ------------------------------------------------------------------ the formula
def ia3_vector_shape(layer, is_feedforward: bool) -> tuple[int, int]:
    """PEFT's shape of l: (1, in_features) for a feed-forward module, else (out_features, 1)."""
    return (1, layer.in_features) if is_feedforward else (layer.out_features, 1)


def ia3_merged_weight(W, l, inverse: bool = False, safe_merge: bool = False, name: str = ""):
    """diag(l)·W0 (l: (out, 1), rows scaled) or W0·diag(l) (l: (1, in), columns scaled): W0 * l.

    ``inverse`` undoes it, W / (l + 1e-8), PEFT's guard against dividing by a zero entry (an entry
    near zero still makes the unmerged weight inaccurate, as PEFT warns). ``safe_merge`` refuses a
    result with NaN/Inf (ValueError) instead of returning it. Works on a bias too: b (out,) with
    l reshaped to (out,).
    """
    out = W / (l + 1e-8) if inverse else W * l       # (out, in) * (out, 1) or (1, in) -> (out, in)
    if safe_merge and not bool(backend.get_xp(out).isfinite(out).all()):
        raise ValueError(f"safe_merge refused {name}: the merged weight has NaN/Inf; the (IA)³ "
                         "vector is broken: retrain or reload it")
    return out.astype(W.dtype, copy=False)


# ------------------------------------------------------------------ the layer
class IA3Linear(Module):
    """A frozen base Linear whose output (or, for a feed-forward module, input) is scaled by ``ia3_l``.

    h = base_layer(x) ⊙ Π l  (output scaling, l: (out, 1))  or  h = base_layer(x ⊙ Π l)  (input
    scaling, l: (1, in)), the product over the active adapters. The base runs its own forward, so a
    4-bit base dequantizes as it always does. Merging folds l into W0 (``ia3_merged_weight``) and
    the bias (output scaling only); a 4-bit base is merged as ``LoraLinear`` merges it (the same
    methods: dequantize, scale, re-quantize).
    """

    def __init__(self, base_layer: Module, module_name: str = "", is_feedforward: bool = False):
        super().__init__()
        if not is_linear_like(base_layer):
            raise ValueError(f"(IA)³ can only wrap Linear layers, got {type(base_layer).__name__}"
                             f"{' at ' + module_name if module_name else ''}")
        self.base_layer = base_layer
        self.ia3_l = ParameterDict()
        self.is_feedforward = bool(is_feedforward)
        self.active_adapters: list = []
        self.merged_adapters: list = []      # in merge order; unmerge reverses it
        self.disable_adapters = False
        self.module_name = module_name
        self.requantization_error = None     # a 4-bit base: the error of the last re-quantization
        base_layer.requires_grad_(False)

    in_features = LoraLinear.in_features
    out_features = LoraLinear.out_features
    weight = LoraLinear.weight
    merged = LoraLinear.merged

    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True) -> None:
        """Add the vector ``ia3_l[adapter_name]``: ones (the output is unchanged, bit for bit) or,
        with ``init_ia3_weights=False``, N(0, 1) entries; float32 (float64 on a float64 base), on
        the base weight's device."""
        if adapter_name in self.ia3_l:
            raise ValueError(f"{self.module_name or 'this layer'} already has an adapter called "
                             f"{adapter_name!r}; pick another name or delete_adapter() it first")
        shape = ia3_vector_shape(self, self.is_feedforward)
        l = np.ones(shape, backend.default_float()) if init_ia3_weights else init_normal(shape, 1.0)
        base_w = getattr(self.base_layer, "weight", None)
        if isinstance(base_w, Tensor) and base_w.data.dtype == np.float64:   # gradient checks
            l = l.astype(np.float64)
        device = backend.device_of(base_w.data) if isinstance(base_w, Tensor) else None
        self.ia3_l[adapter_name] = Parameter(backend.to_device(l, device))

    set_adapter = LoraLinear.set_adapter      # the active adapters: a name or a list of names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into {self.module_name}; "
                             "unmerge_adapter() before deleting it")
        if adapter_name in self.ia3_l:
            del self.ia3_l[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def forward(self, x):
        """h = W0·x ⊙ Π l, or W0·(x ⊙ Π l) for a feed-forward module; W0·x if merged or disabled."""
        if self.disable_adapters:
            if self.merged:          # the base weight holds l: take it out so "disabled" means the base
                self.unmerge()
            return self.base_layer(x)
        if self.merged:              # W0 already holds l: scaling again would apply it twice
            return self.base_layer(x)
        scale = None
        for name in self.active_adapters:
            if name in self.ia3_l:
                l = self.ia3_l[name].reshape(-1)              # (1, in) -> (in,) or (out, 1) -> (out,)
                scale = l if scale is None else scale * l
        if scale is None:
            return self.base_layer(x)
        if self.is_feedforward:
            return self.base_layer(x * scale)                 # (..., in) * (in,) -> (..., out)
        return self.base_layer(x) * scale                     # (..., out) * (out,)

    # ------------------------------------------------------------------ merging (LoraLinear's weight I/O)
    _mergeable_weight = LoraLinear._mergeable_weight
    _store_weight = LoraLinear._store_weight
    _check_mergeable = LoraLinear._check_mergeable
    dequantize_base = LoraLinear.dequantize_base

    def _scale_weights(self, names, inverse: bool, safe_merge: bool = False) -> None:
        """W0 ← W0 * l (or / l) for each adapter in ``names``, and the bias for output scaling."""
        w = self._mergeable_weight()
        bias = getattr(self.base_layer, "bias", None)
        try:
            for name in names:
                l = self.ia3_l[name].data                     # (out, 1) or (1, in)
                where = f"{self.module_name} ({name})"
                new_w = ia3_merged_weight(w.data, l, inverse, safe_merge, where)
                new_b = None if self.is_feedforward or bias is None else \
                    ia3_merged_weight(bias.data, l.reshape(-1), inverse, safe_merge, where)  # (out,)
                w.data = new_w
                if new_b is not None:
                    bias.data = new_b
                if not inverse:
                    self.merged_adapters.append(name)
        finally:
            self._store_weight(w)

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        """W0 ← W0 * l for each adapter (default: the active ones) not merged yet; ``safe_merge``
        leaves W0 untouched and raises when the result would hold NaN/Inf."""
        names = self.active_adapters if adapter_names is None else \
            ([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        names = [n for n in names if n in self.ia3_l and n not in self.merged_adapters]
        if names:
            self._scale_weights(names, inverse=False, safe_merge=safe_merge)

    def unmerge(self) -> None:
        """W0 ← W0 / (l + 1e-8) for every merged adapter, last merged first (exact up to rounding
        while no entry of l is near zero; a 4-bit base comes back only to within NF4 rounding)."""
        names = self.merged_adapters[::-1]
        self.merged_adapters = []
        if names:
            self._scale_weights(names, inverse=True)

    def extra_repr(self) -> str:
        kind = "input (feed-forward)" if self.is_feedforward else "output"
        return f"adapters={list(self.ia3_l)}, scales the {kind}{', merged' if self.merged else ''}"


# ------------------------------------------------------------------ which modules, and the tuner
def _plain_modules(model: Module):
    """``targets._plain_modules`` (no insides of wrappers), skipping the insides of (IA)³ layers too."""
    ia3 = [n for n, m in model.named_modules() if isinstance(m, IA3Linear)]
    return [(n, m) for n, m in _lora_plain_modules(model) if not any(n.startswith(p + ".") for p in ia3)]


def _is_target_type(m) -> bool:
    return is_linear_like(m) or isinstance(m, IA3Linear)


def _listed(patterns, name: str, kind: str, suffix_sep: str = ".") -> bool:
    """PEFT's test of ``name`` against a regex (whole name) or a list (equal, or ending in
    ``suffix_sep`` + entry); the regex runs under config.py's time bound."""
    if isinstance(patterns, str):
        return _user_match(f"{kind} {patterns!r}", patterns, name, full=True) is not None
    return any(name == p or name.endswith(suffix_sep + p) for p in patterns or ())


def is_feedforward(config: IA3Config, module_name: str) -> bool:
    """Does this module scale its input? PEFT's rule: the regex matches the whole name, or the name
    ends with a listed entry (no dot needed)."""
    return _listed(config.feedforward_modules, module_name, "feedforward_modules", suffix_sep="")


def plan_ia3(model: Module, config: IA3Config):
    """Which modules ``config`` adapts in ``model``, without changing anything: (config with Llama's
    defaults and "all-linear" resolved, [names of Linear layers], [names of modules to save]).

    A ValueError names the model's Linear layers when the targets match none of them."""
    modules = _plain_modules(model)
    targets = IA3_DEFAULT_TARGET_MODULES if config.target_modules is None else config.target_modules
    if targets == "all-linear":
        heads = _output_head_names(model)
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in modules
                          if n and _is_target_type(m) and n not in heads})
    ff = config.feedforward_modules
    ff = IA3_DEFAULT_FEEDFORWARD_MODULES if ff is None else ff
    config = dataclasses.replace(config, target_modules=targets, feedforward_modules=ff)   # copies lists
    # target and modules_to_save matching are LoRA's (config.py, targets.py): asked through a LoraConfig
    view = LoraConfig(target_modules=config.target_modules, modules_to_save=config.modules_to_save)
    names = [n for n, m in modules if n and _is_target_type(m) and matches(view, n)
             and not _listed(config.exclude_modules, n, "exclude_modules")]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules if _is_target_type(m)})
        raise ValueError(f"target_modules={config.target_modules!r} matched no Linear layer (after "
                         f"exclude_modules); the model's Linear layers are named {linear}")
    return config, names, modules_to_save_names(modules, config.modules_to_save)


def plan_adapter(model: Module, config, tuner: Module | None = None):
    """``plan_ia3`` for an IA3Config, ``targets.plan_injection`` for a LoraConfig; with ``tuner``
    (a PeftModel's ``base_model``), adding an adapter of the other kind is refused, as in PEFT."""
    if tuner is not None and isinstance(tuner, IA3Model) != isinstance(config, IA3Config):
        have, new = ("(IA)³", "LoRA") if isinstance(tuner, IA3Model) else ("LoRA", "(IA)³")
        raise ValueError(f"this model holds {have} adapters and cannot take a {new} one (PEFT refuses "
                         "mixing adapter types too); unload() it first or use a separate model")
    if isinstance(config, IA3Config):
        return plan_ia3(model, config)
    return plan_injection(model, config)


class IA3Model(Module):
    """PEFT's ``IA3Model``: holds the user's model as ``.model`` (hence ``base_model.model.`` in names)
    and injects (IA)³ layers into it; ``PeftModel`` does everything else."""

    def __init__(self, model: Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def inject(self, adapter_name: str, config: IA3Config, names, active_adapters) -> None:
        """Wrap (or extend) each Linear in ``names`` (from ``plan_ia3``) with vector ``adapter_name``."""
        for name in names:
            layer = self.model.get_submodule(name)
            if not isinstance(layer, IA3Linear):
                layer = IA3Linear(layer, module_name=name, is_feedforward=is_feedforward(config, name))
                self.model.set_submodule(name, layer)     # keeps its place among its siblings
            layer.update_layer(adapter_name, init_ia3_weights=config.init_ia3_weights)
            layer.set_adapter(active_adapters)

    def mark_trainable(self, adapter_name: str) -> None:
        """Let the optimizer train this adapter's vectors (everything else stays as it is)."""
        for m in self.model.modules():
            if isinstance(m, IA3Linear) and adapter_name in m.ia3_l:
                m.ia3_l[adapter_name].requires_grad = True


__all__ = ["IA3Config", "IA3Linear", "IA3Model", "ia3_merged_weight", "ia3_vector_shape", "plan_ia3",
           "plan_adapter", "adapter_config_class", "IA3_DEFAULT_TARGET_MODULES",
           "IA3_DEFAULT_FEEDFORWARD_MODULES"]
