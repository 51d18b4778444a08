"""Injecting LoRA into a model from the outside: ``get_peft_model`` and ``PeftModel`` (PEFT's API).

The model (``models/llama.py``) knows nothing about LoRA. ``get_peft_model`` finds the targeted
modules by dotted name (``config.target_modules``; the matching is ``lora/targets.py``), replaces each
``Linear`` with a ``LoraLinear`` that wraps it (``Module.set_submodule``, which keeps its place among
its siblings, so parameter order stays the model's own), and freezes everything except the adapter factors A and B (and, on request, biases
and ``modules_to_save``). That is the whole trick of LoRA (Hu et al., 2021): the pretrained weights
never change, only r·(in + out) new numbers per adapted layer are trained.

The object layout copies PEFT's, so that names line up everywhere: ``PeftModel.base_model`` is a
``LoraModel`` whose ``.model`` is the original model, hence parameter names like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` exactly as in PEFT, and
the adapter file keys are those names with the adapter name removed (``lora/io.py``).

Several named adapters can live in one model (``add_adapter``, ``load_adapter``), one (or a list) is
active (``set_adapter``); they can be merged into the base weights for free inference
(``merge_adapter``, ``merge_and_unload``), switched off (``disable_adapter()``), removed
(``delete_adapter``, ``unload``) or combined (``add_weighted_adapter``, ``lora/combine.py``).
"""
from __future__ import annotations

import warnings

import dataclasses
import re
from contextlib import contextmanager

from ..nn import Module
from ..tensor import Tensor
from . import io as adapter_io
from . import mixed
from .combine import add_weighted_adapter as _add_weighted_adapter
from .config import LoraConfig
from .ia3 import IA3Config, IA3Linear, IA3Model, plan_adapter
from .layer import LoraLinear, ModulesToSaveWrapper


def _check_adapter_name(name) -> str:
    if not isinstance(name, str) or not name or "." in name or not re.fullmatch(r"[\w\-]+", name):
        raise ValueError(f"adapter name {name!r} is not usable: use letters, digits, '_' or '-' "
                         "(no dots: the name becomes part of parameter names like lora_A.<name>.weight)")
    return name


def _check_config(peft_config) -> None:
    if not isinstance(peft_config, (LoraConfig, IA3Config)):
        raise ValueError(f"peft_config must be a LoraConfig or an IA3Config, got "
                         f"{type(peft_config).__name__}")


class LoraModel(Module):
    """PEFT's ``LoraModel``: holds the user's model as ``.model`` (hence the ``base_model.model.``
    prefix in names) and passes calls through to it."""

    def __init__(self, model: Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class PeftModel(Module):
    """A model with LoRA adapters injected; built by ``get_peft_model`` or ``PeftModel.from_pretrained``.

    Attributes: ``base_model`` (a LoraModel; ``base_model.model`` is the wrapped model, whose Linear
    layers are now LoraLinear), ``peft_config`` ({adapter name: LoraConfig}), ``active_adapter``.
    Given an ``IA3Config`` instead, ``base_model`` is an ``IA3Model`` and the targeted layers are
    ``IA3Linear`` ((IA)³'s learned scaling vectors, ``lora/ia3.py``); the methods are the same.
    Calling it (``model(input_ids, labels=...)``) and ``generate`` pass through to the wrapped model;
    other attributes (``config``, ...) are looked up there too.
    """

    def __init__(self, model: Module, peft_config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        if isinstance(model, PeftModel):
            raise ValueError("the model is already a PeftModel; use add_adapter() to add another adapter")
        if any(isinstance(m, (LoraLinear, IA3Linear, ModulesToSaveWrapper)) for m in model.modules()):
            raise ValueError("the model already contains LoRA or (IA)³ layers; wrap the original model "
                             "once, then add_adapter() for more adapters (or unload() first)")
        _check_config(peft_config)
        # the tuner, as in PEFT: LoraModel, or IA3Model for (IA)³ vectors (lora/ia3.py)
        self.base_model = IA3Model(model) if isinstance(peft_config, IA3Config) else LoraModel(model)
        self.peft_config: dict = {}
        self.active_adapters: list = [_check_adapter_name(adapter_name)]
        self._inject(adapter_name, peft_config)
        self.set_adapter(adapter_name)

    # ------------------------------------------------------------------ pass-through
    def forward(self, *args, adapter_names=None, **kwargs):
        """The wrapped model's forward with the active adapter(s); ``adapter_names`` (one name or
        "__base__" per batch row, inference only) runs row i with adapter ``adapter_names[i]``
        alone instead (``lora/mixed.py``)."""
        if adapter_names is None:
            return self.base_model.model(*args, **kwargs)
        ids = args[0] if args else kwargs.get("input_ids")
        with self._rows_use_adapters(ids, adapter_names, self.training):
            return self.base_model.model(*args, **kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        """The wrapped model's ``generate``; its Linear layers run with the active adapter(s), or,
        given ``adapter_names`` (one per prompt row), row i with adapter ``adapter_names[i]`` at
        every step, the prompt's and each cached one's (``lora/mixed.py``)."""
        if adapter_names is None:
            return self.base_model.model.generate(*args, **kwargs)
        ids = args[0] if args else kwargs.get("input_ids")
        # generation runs the model in eval mode whatever its mode now (models/generation.py), so
        # the training-mode refusal, which guards dropout and training forwards, does not apply
        with self._rows_use_adapters(ids, adapter_names, training=False):
            return self.base_model.model.generate(*args, **kwargs)

    def _rows_use_adapters(self, input_ids, adapter_names, training: bool):
        """Check a mixed-batch request (``mixed.check_request``) and return the context in which
        every LoRA layer and ``modules_to_save`` wrapper runs row i with ``adapter_names[i]``."""
        ids = input_ids.data if isinstance(input_ids, Tensor) else input_ids
        shape = getattr(ids, "shape", None)
        if shape is None or len(shape) not in (1, 2):
            raise ValueError(f"adapter_names needs input_ids of shape (batch, seq) or (seq,), got "
                             f"{type(input_ids).__name__} {shape}; pass the token ids first")
        lora = [m for _, m in self.lora_layers()]
        wrappers = [m for _, m in self._saved_module_wrappers()]
        names = mixed.check_request(adapter_names, 1 if len(shape) == 1 else shape[0], training,
                                    lora, wrappers)
        return mixed.rows_use_adapters(lora + wrappers, names)

    def __getattr__(self, name):
        # only reached when normal lookup fails. As in PEFT, ask the LoraModel first (so that
        # ``peft_model.model`` is the wrapped model), then the wrapped model (config, ...).
        if name.startswith("_") or "_modules" not in self.__dict__ or "base_model" not in self._modules:
            raise AttributeError(name)
        lora_model = self._modules["base_model"]
        if name in lora_model._modules or name in lora_model.__dict__:
            return getattr(lora_model, name)
        return getattr(lora_model.model, name)

    def get_base_model(self) -> Module:
        """The wrapped model (with its LoraLinear layers in place)."""
        return self.base_model.model

    @property
    def active_adapter(self) -> str:
        """The active adapter's name (the first one when several are active)."""
        return self.active_adapters[0]

    # ------------------------------------------------------------------ where the adapters live
    def lora_layers(self):
        """(dotted name in the wrapped model, LoraLinear) for every LoRA layer."""
        return [(n, m) for n, m in self.base_model.model.named_modules() if isinstance(m, LoraLinear)]

    def adapter_layers(self):
        """(dotted name, layer) for every adapter layer: the LoraLinear layers, or the IA3Linear
        layers of an (IA)³ model; what switching, merging and unloading walk over."""
        return [(n, m) for n, m in self.base_model.model.named_modules()
                if isinstance(m, (LoraLinear, IA3Linear))]

    def _saved_module_wrappers(self):
        return [(n, m) for n, m in self.base_model.model.named_modules()
                if isinstance(m, ModulesToSaveWrapper)]

    def plan_injection(self, config: LoraConfig):
        """What ``config`` would adapt in this model, without changing anything (see module-level
        ``plan_injection``; ``ia3.plan_ia3`` for an IA3Config). A config of the other kind than the
        adapters already here is refused: LoRA and (IA)³ never share a model, as in PEFT."""
        return plan_adapter(self.base_model.model, config, self.base_model)

    def _inject(self, adapter_name: str, config: LoraConfig) -> None:
        """Wrap (or extend) every targeted Linear with adapter ``adapter_name``; record its config."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter called {adapter_name!r} already exists; pick another name or "
                             "delete_adapter() it first")
        config, lora_names, saved = self.plan_injection(config)
        model = self.base_model.model
        if isinstance(config, IA3Config):   # one vector per layer instead of A and B (lora/ia3.py)
            self.base_model.inject(adapter_name, config, lora_names, self.active_adapters)
        else:
            for name in lora_names:
                layer = model.get_submodule(name)
                if not isinstance(layer, LoraLinear):
                    layer = LoraLinear(layer, module_name=name)
                    model.set_submodule(name, layer)    # keeps its place among its siblings
                layer.update_layer(adapter_name, r=config.rank_for(name),
                                   lora_alpha=config.alpha_for(name), lora_dropout=config.lora_dropout,
                                   init_lora_weights=config.init_lora_weights,
                                   use_rslora=config.use_rslora, use_dora=config.use_dora,
                                   loftq_config=config.loftq_config)
                layer.set_adapter(self.active_adapters)
        for name in saved:
            wrapper = model.get_submodule(name)
            if not isinstance(wrapper, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(wrapper, module_name=name)
                model.set_submodule(name, wrapper)
            wrapper.update(adapter_name)
            wrapper.set_adapter(self.active_adapters)
        self.peft_config[adapter_name] = config
        self._update_trainable()

    def _update_trainable(self) -> None:
        """Freeze everything, then unfreeze what the active adapters train (PEFT's rules).

        Trainable: lora_A/lora_B (and modules_to_save copies) of the active adapters whose config is
        not in inference_mode, and biases per the config's ``bias`` ("all": every bias, "lora_only":
        those of adapted layers). Everything else, in particular every base weight, is frozen.
        """
        model = self.base_model.model
        model.requires_grad_(False)
        for adapter in self.active_adapters:
            config = self.peft_config.get(adapter)
            if config is None or config.inference_mode:
                continue
            if isinstance(config, IA3Config):   # (IA)³ trains its vectors ia3_l
                self.base_model.mark_trainable(adapter)
            for _, layer in self.lora_layers():
                if adapter in layer.lora_A:
                    layer.lora_A[adapter].requires_grad_(True)
                    layer.lora_B[adapter].requires_grad_(True)
                    if adapter in layer.lora_magnitude_vector:   # DoRA's m trains with A and B
                        layer.lora_magnitude_vector[adapter].requires_grad = True
                    if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                        layer.base_layer.bias.requires_grad = True
            for _, wrapper in self._saved_module_wrappers():
                if adapter in wrapper.modules_to_save:
                    wrapper.modules_to_save[adapter].requires_grad_(True)
            if getattr(config, "bias", "none") == "all":    # an IA3Config has no bias field
                for n, p in model.named_parameters():
                    if n.endswith(".bias") or n == "bias":
                        p.requires_grad = True

    # ------------------------------------------------------------------ counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; a wrapped layer's base weight is counted once, and
        weights stored in 4 bits (QLoRA), which are not Parameters, count too (as in PEFT)."""
        trainable = total = 0
        for _, p in self.named_parameters():
            total += p.size
            if p.requires_grad:
                trainable += p.size
        total += sum(int(getattr(m, "quantized_numel", 0)) for m in self.modules())
        return int(trainable), int(total)

    def print_trainable_parameters(self) -> None:
        """PEFT's one-line summary, e.g. ``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7300``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ adapters
    def _check_exists(self, names) -> list:
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"no adapter called {n!r}; this model has {list(self.peft_config)}")
        return names

    def set_adapter(self, adapter_name) -> None:
        """Make ``adapter_name`` (or a list of names) the adapter(s) that run and train.

        As in PEFT, switching while adapters are merged into the base first unmerges them (with a
        warning): otherwise the merged adapter would keep answering under the new name.
        """
        names = self._check_exists(adapter_name)
        merged = sorted({a for _, layer in self.adapter_layers() for a in layer.merged_adapters})
        if merged and merged != sorted(names):
            warnings.warn(f"adapters {merged} are merged; unmerging them before switching to {names}")
            self.unmerge_adapter()
        self.active_adapters = names
        for _, layer in self.adapter_layers():
            layer.set_adapter(names)
        for _, wrapper in self._saved_module_wrappers():
            wrapper.set_adapter(names)
        self._update_trainable()

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Add a second (third, ...) adapter with its own config; it is created inactive and frozen
        (``set_adapter`` switches to it)."""
        _check_config(peft_config)
        self._inject(adapter_name, peft_config)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its weights. Refused while it is merged, or if it is the only one."""
        self._check_exists(adapter_name)
        merged_in = [n for n, layer in self.adapter_layers() if adapter_name in layer.merged_adapters]
        if merged_in:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weights ({merged_in[0]}"
                             f"{' ...' if len(merged_in) > 1 else ''}); call unmerge_adapter() first")
        if len(self.peft_config) == 1:
            raise ValueError(f"{adapter_name!r} is the only adapter; use unload() to get the base "
                             "model back instead")
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        for _, wrapper in self._saved_module_wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name]
        self.set_adapter(remaining or next(iter(self.peft_config)))

    @contextmanager
    def disable_adapter(self):
        """``with model.disable_adapter(): ...`` runs the base model alone (adapters skipped).

        A merged adapter is unmerged first (the base weights must be the original ones); it stays
        unmerged afterwards, as in PEFT.
        """
        self.unmerge_adapter()
        layers = [m for _, m in self.adapter_layers()] + [m for _, m in self._saved_module_wrappers()]
        for m in layers:
            m.disable_adapters = True
        try:
            yield self
        finally:
            for m in layers:
                m.disable_adapters = False

    # ------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Fold ΔW = (α/r)·B·A of the active adapters (or those named) into the base weights."""
        names = self.active_adapters if adapter_names is None else self._check_exists(adapter_names)
        for _, layer in self.adapter_layers():
            layer.merge(names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Subtract every merged ΔW again: the base weights are W0 (up to float rounding)."""
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def _replace_wrappers(self, merge: bool, safe_merge: bool = False, adapter_names=None,
                          requantize: bool = False) -> Module:
        model = self.base_model.model
        if merge and not requantize:
            for _, layer in self.adapter_layers():
                layer.dequantize_base()      # a 4-bit base becomes float: W = dequant(W0) + ΔW
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        else:
            self.unmerge_adapter()
        for name, layer in self.adapter_layers():
            model.set_submodule(name, layer.base_layer)
        for name, wrapper in self._saved_module_wrappers():
            model.set_submodule(name, wrapper.active_module() if merge else wrapper.original_module)
        self.peft_config = {}
        return model

    def merge_and_unload(self, safe_merge: bool = False, adapter_names=None,
                         requantize: bool = False) -> Module:
        """Merge the active adapters into the base weights and return the wrapped model with plain
        Linear layers again: a standalone model with no LoRA code in its forward pass.

        The PeftModel is emptied (no adapters left). The returned model's parameters keep the
        requires_grad flags they had (frozen), as in PEFT; call ``requires_grad_(True)`` to train it.

        A 4-bit base (QLoRA): by default each adapted layer becomes a float32 ``Linear`` holding
        dequant(W0) + ΔW exactly; ``requantize=True`` rounds that back to 4 bits instead (a smaller
        model, one more rounding: ``quant.requantization_errors(model)`` reports it per layer).
        """
        return self._replace_wrappers(merge=True, safe_merge=safe_merge, adapter_names=adapter_names,
                                      requantize=requantize)

    def unload(self) -> Module:
        """Remove every adapter without merging and return the original model (any merged adapter is
        unmerged first, so the weights are W0 again)."""
        return self._replace_wrappers(merge=False)

    def add_weighted_adapter(self, adapters, weights, adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None) -> None:
        """Combine adapters into a new one; see ``lora.combine.add_weighted_adapter`` (which are
        exact: "cat"; approximate: "svd" truncates, "linear" adds cross terms)."""
        if isinstance(self.base_model, IA3Model):
            raise ValueError("add_weighted_adapter combines LoRA adapters and this model holds (IA)³ "
                             "ones; combine LoRA adapters, or train one (IA)³ adapter on the mix")
        _add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank)

    # ------------------------------------------------------------------ files
    def save_pretrained(self, save_directory, selected_adapters=None,
                        path_initial_model_for_weight_conversion=None) -> None:
        """Write PEFT's files: adapter_config.json + adapter_model.safetensors for "default" in
        ``save_directory``, and each other adapter in a subfolder named after it; the folder is
        replaced as a whole (old or new after a crash, never a mix: ``fileio.atomic_folder``).

        ``path_initial_model_for_weight_conversion``: the folder where a PiSSA/OLoRA adapter was
        saved right after its initialisation; the adapter is then written as a plain LoRA of rank 2r
        on the ORIGINAL base weights (``lora.init.to_plain_lora``), as PEFT does."""
        adapter_io.save_adapters(self, save_directory, selected_adapters,
                                 path_initial_model_for_weight_conversion)

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter saved in directory ``model_id`` under ``adapter_name`` (inactive; call
        ``set_adapter`` to use it). Checked against this model's module names and shapes first."""
        adapter_io.load_adapter_into(self, model_id, adapter_name, is_trainable=is_trainable)

    @classmethod
    def from_pretrained(cls, model: Module, model_id, adapter_name: str = "default",
                        is_trainable: bool = False) -> "PeftModel":
        """Wrap ``model`` with the adapter saved in directory ``model_id`` (ours or PEFT's).

        ``is_trainable=False`` (PEFT's default) loads it for inference: nothing requires grad.
        The files are checked against the model before the model is touched.
        """
        return adapter_io.from_pretrained(cls, model, model_id, adapter_name, is_trainable)

    def extra_repr(self) -> str:
        return f"adapters={list(self.peft_config)}, active={self.active_adapters}"


QUANTIZE_TYPES = ("nf4", "fp4")


def get_peft_model(model: Module, peft_config: LoraConfig, adapter_name: str = "default",
                   quantize: str | None = None, quant_blocksize: int = 64,
                   double_quant: bool = True) -> PeftModel:
    """Inject LoRA adapters into ``model`` in place and return the ``PeftModel`` around it.

    The config is copied (resolved target names are recorded in the copy, ``peft_model.peft_config``),
    so the caller's LoraConfig is never modified.

    QLoRA (Dettmers et al., 2023): ``quantize="nf4"`` first stores every frozen Linear of the model
    in 4-bit NormalFloat (``quant.quantize_model``: blocksize ``quant_blocksize``, double
    quantization of the constants by default; ``lm_head`` and ``modules_to_save`` stay in full
    precision), then injects the adapters, whose factors A and B train in float32 on top of the
    4-bit bases. ``quantize=None`` (default) is plain LoRA.
    """
    _check_config(peft_config)
    if quantize is not None:
        if quantize not in QUANTIZE_TYPES:
            raise ValueError(f"quantize={quantize!r} is not a 4-bit type; use one of {QUANTIZE_TYPES} "
                             "(QLoRA uses 'nf4') or None for plain LoRA")
        from ..quant import quantize_model
        plan_adapter(model, peft_config)   # a config that matches nothing fails before any change
        keep = ("lm_head",) + tuple(peft_config.modules_to_save or ())
        quantize_model(model, blocksize=quant_blocksize, double_quant=double_quant,
                       skip_modules=keep, quant_type=quantize)
    return PeftModel(model, dataclasses.replace(peft_config), adapter_name)
