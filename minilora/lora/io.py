"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

An adapter is tiny next to its base model (r·(in + out) numbers per adapted layer), so it is saved on
its own and loaded onto any copy of the same base. The layout is Hugging Face PEFT's
(``adapter_config.json`` + ``adapter_model.safetensors``), so files move both ways between minilora and PEFT:

* tensor keys are the in-memory parameter names with the adapter name removed:
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` is stored as
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; a module in
  ``modules_to_save`` as ``base_model.model.lm_head.weight``; a DoRA adapter's magnitude
  ``...q_proj.lora_magnitude_vector.default`` as ``...q_proj.lora_magnitude_vector`` (PEFT's key);
  an (IA)³ vector ``...k_proj.ia3_l.default`` as ``...k_proj.ia3_l`` (``adapter_config.json``'s
  ``peft_type`` says which kind a folder holds: "LORA" or "IA3", ``lora/ia3.py``);
* the "default" adapter goes in the directory itself, any other in a subfolder named after it;
* a save replaces the whole folder at once (``fileio.atomic_folder``: every adapter's files are
  written into a temporary sibling folder that then takes the name), so after a crash or ``kill -9``
  the folder holds the old save or the new one, never one's config beside the other's weights;
  entries the save does not own (another adapter's subfolder, a tokenizer) are kept, and a symbolic
  link in the old folder is kept as a link, never written through. Nothing is ever pickled.

Loading reads the folder with ``fileio.read_consistently`` (a concurrent save is waited out) and
checks the files against the model before touching it: a missing file, a config that is not LoRA, a
corrupt or truncated safetensors file, NaN or infinite weights, a weight for a module the model does
not have, a shape that does not fit the base layer, a missing or unexpected key, a regex that
backtracks without end: each is a one-line ``AdapterError`` that names the file, the thing and the fix.
"""
from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np

from .. import backend
from ..fileio import (atomic_folder, read_consistently, recover, save_safetensors_atomic,
                      write_text_atomic)
from ..models.hf_io import CheckpointError, load_safetensors
from .config import AdapterError, LoraConfig
from .ia3 import (IA3Config, IA3Linear, adapter_config_class, ia3_vector_shape, is_feedforward,
                  plan_adapter)
from .init import to_plain_lora
from .layer import LoraLinear, ModulesToSaveWrapper

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped model


# ------------------------------------------------------------------ tensors on disk
def write_safetensors(path: str, tensors: dict) -> None:
    """Save {name: array} as safetensors (host copies), atomically, with PEFT's metadata."""
    host = {k: np.ascontiguousarray(backend.to_numpy(v)) for k, v in tensors.items()}
    save_safetensors_atomic(host, path, metadata={"format": "pt"})


def read_safetensors(path: str, allow_nonfinite: bool = False) -> dict:
    """{name: float32 NumPy array} from a safetensors file (F32/F16/BF16, as PEFT may write them),
    with a one-line ``AdapterError`` naming the file when it is corrupt, truncated or holds NaN or
    infinity (unless ``allow_nonfinite``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; save the adapter with save_pretrained first")
    try:
        return load_safetensors(path, allow_nonfinite=allow_nonfinite)
    except CheckpointError as e:   # the checks are the model checkpoints'; the family is adapters'
        raise AdapterError(f"{e}; save or copy the adapter again") from None


# ------------------------------------------------------------------ key names
def _adapter_param_names(peft_model, adapter_name: str) -> dict:
    """{file key: Parameter} for one adapter (PEFT's get_peft_model_state_dict naming)."""
    config = peft_model.peft_config[adapter_name]
    out = {}
    model = peft_model.base_model.model
    for mod_name, mod in model.named_modules():
        full = PREFIX + mod_name
        if isinstance(mod, LoraLinear) and adapter_name in mod.lora_A:
            out[f"{full}.lora_A.weight"] = mod.lora_A[adapter_name].weight   # (r, in)
            out[f"{full}.lora_B.weight"] = mod.lora_B[adapter_name].weight   # (out, r)
            if adapter_name in mod.lora_magnitude_vector:   # DoRA's m: PEFT's key has no ".weight"
                out[f"{full}.lora_magnitude_vector"] = mod.lora_magnitude_vector[adapter_name]  # (out,)
            bias = getattr(mod.base_layer, "bias", None)
            if config.bias == "lora_only" and bias is not None:
                out[f"{full}.base_layer.bias"] = bias
        elif isinstance(mod, IA3Linear) and adapter_name in mod.ia3_l:   # (IA)³: no ".weight" either
            out[f"{full}.ia3_l"] = mod.ia3_l[adapter_name]               # (out, 1) or (1, in)
        elif isinstance(mod, ModulesToSaveWrapper) and adapter_name in mod.modules_to_save:
            for pname, p in mod.modules_to_save[adapter_name].named_parameters():
                out[f"{full}.{pname}"] = p
    if getattr(config, "bias", "none") == "all":    # an IA3Config has no bias field
        for pname, p in peft_model.named_parameters():
            if pname.endswith(".bias") and ".lora_" not in pname and ".modules_to_save." not in pname \
                    and ".original_module." not in pname:
                out.setdefault(pname, p)
    return out


def get_peft_model_state_dict(peft_model, adapter_name: str = "default") -> dict:
    """{file key: array} of one adapter, as written to adapter_model.safetensors."""
    peft_model._check_exists(adapter_name)
    return {k: p.data for k, p in _adapter_param_names(peft_model, adapter_name).items()}


# ------------------------------------------------------------------ saving
def save_adapters(peft_model, save_directory, selected_adapters=None,
                  path_initial_model_for_weight_conversion=None) -> None:
    """Write each adapter's config and weights (PeftModel.save_pretrained); with
    ``path_initial_model_for_weight_conversion``, the one adapter saved is first turned from
    PiSSA/OLoRA on its residual base into plain LoRA on W0 (``init.to_plain_lora``)."""
    if not peft_model.peft_config:
        raise ValueError("this PeftModel has no adapters left (merge_and_unload/unload was called); "
                         "save the returned model with its own save_pretrained instead")
    names = list(peft_model.peft_config) if selected_adapters is None \
        else peft_model._check_exists(selected_adapters)
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory path")
    initial = None
    if path_initial_model_for_weight_conversion is not None:
        if len(names) != 1:
            raise ValueError(f"path_initial_model_for_weight_conversion holds one adapter's start but "
                             f"{names} would be saved; pass selected_adapters=[name]")
        initial = read_adapter_dir(path_initial_model_for_weight_conversion)[1]
    # the default adapter's files, and the subfolder of each adapter saved now, are replaced
    owned = ((CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin") if "default" in names else ()) + \
        tuple(glob.escape(n) for n in names if n != "default")
    with atomic_folder(save_directory, owned=owned) as tmp:
        for name in names:
            target = tmp if name == "default" else tmp / name
            os.makedirs(target, exist_ok=True)
            config = dataclasses.replace(peft_model.peft_config[name], inference_mode=True)
            state = get_peft_model_state_dict(peft_model, name)
            if initial is not None:
                config, state = to_plain_lora(config, state, initial,
                                              where=os.fspath(path_initial_model_for_weight_conversion))
            write_safetensors(os.path.join(target, WEIGHTS_NAME), state)
            write_text_atomic(os.path.join(target, CONFIG_NAME), config.to_json_string())


# ------------------------------------------------------------------ loading
def read_adapter_dir(directory, allow_nonfinite: bool = False) -> tuple[LoraConfig, dict]:
    """(LoraConfig or IA3Config, by peft_type; {file key: array}) from an adapter directory, both
    from one save, with one-line errors naming the file."""
    directory = os.fspath(directory)
    recover(directory)   # a save interrupted between its two renames (fileio.atomic_folder)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    return read_consistently(directory, lambda: _read_adapter_dir(directory, allow_nonfinite))


def _read_adapter_dir(directory: str, allow_nonfinite: bool) -> tuple[LoraConfig, dict]:
    cfg_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}; is it a folder written by "
                                "save_pretrained? (a non-default adapter lives in a subfolder named "
                                "after it)")
    config = adapter_config_class(cfg_path).from_json_file(cfg_path)   # by peft_type: LoRA or (IA)³
    w_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(w_path):
        if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
            raise AdapterError(f"{directory} has only adapter_model.bin, a pickle, which minilora never "
                               "loads (it can run code); re-save it with PEFT's safe_serialization=True")
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}; the adapter was not saved "
                                "completely: save it again")
    return config, read_safetensors(w_path, allow_nonfinite=allow_nonfinite)


def _check_against_model(peft_or_model, config: LoraConfig, tensors: dict, directory: str,
                         lora_names: list, saved_names: list) -> None:
    """Every key names a module this model has, with the shape its base layer needs.

    ``lora_names`` / ``saved_names`` are the modules the config would adapt / save (from
    ``PeftModel.plan_injection``), so missing and unexpected keys are found before any change.
    """
    model = peft_or_model
    expected = {}
    for name in lora_names:
        layer = model.get_submodule(name)
        if isinstance(config, IA3Config):   # one (IA)³ vector per module, its shape from the layer
            shape = ia3_vector_shape(layer, is_feedforward(config, name))
            expected[f"{PREFIX}{name}.ia3_l"] = ("saved", name, shape, None)
            continue
        base = layer.base_layer if isinstance(layer, LoraLinear) else layer
        r = config.rank_for(name)
        expected[f"{PREFIX}{name}.lora_A.weight"] = ("A", name, r, base)
        expected[f"{PREFIX}{name}.lora_B.weight"] = ("B", name, r, base)
        if config.use_dora:   # DoRA's magnitude: one number per output row
            expected[f"{PREFIX}{name}.lora_magnitude_vector"] = ("saved", name, (base.out_features,), None)
    for name in saved_names:
        mod = model.get_submodule(name)
        mod = mod.original_module if isinstance(mod, ModulesToSaveWrapper) else mod
        for pname, p in mod.named_parameters():
            expected[f"{PREFIX}{name}.{pname}"] = ("saved", name, p.shape, None)
    where = os.path.join(directory, WEIGHTS_NAME)
    for key, array in tensors.items():
        if key not in expected:
            if getattr(config, "bias", "none") != "none" and key.endswith(".bias"):
                continue  # biases are checked by name when they are copied in
            if key.endswith(".lora_magnitude_vector") and not getattr(config, "use_dora", False):
                raise AdapterError(f"{where} has a DoRA magnitude {key!r} but {CONFIG_NAME} says "
                                   "use_dora is false; the config and weights do not belong together")
            if not key.startswith(PREFIX):
                raise AdapterError(f"{where}: key {key!r} does not start with {PREFIX!r}; it is not a "
                                   "PEFT adapter file")
            mod_name = key[len(PREFIX):].rsplit(".", 2)[0] if ".lora_" in key else \
                key[len(PREFIX):].removesuffix(".ia3_l")
            raise AdapterError(f"{where} has a weight {key!r} that adapter_config.json's target_modules "
                               f"do not produce for this model (module {mod_name!r} is not targeted or "
                               "does not exist); was the adapter trained on a different base model?")
        kind, name, want, base = expected[key]
        shape = tuple(array.shape)
        if kind in ("A", "B"):
            # A is (r, in_features), B is (out_features, r): which axis is the layer's, which the rank
            feature_axis, rank_axis, feature = (1, 0, "in_features") if kind == "A" else \
                (0, 1, "out_features")
            n_features = getattr(base, feature)
            if len(shape) != 2 or shape[feature_axis] != n_features:
                raise AdapterError(f"{where}: shape of lora_{kind} for {name} is {shape} but the base "
                                   f"layer has {feature} {n_features}; the adapter was trained on a "
                                   "different base model")
            if shape[rank_axis] != want:
                raise AdapterError(f"{where}: lora_{kind} for {name} has rank {shape[rank_axis]} but "
                                   f"{CONFIG_NAME} says r={want}; the config and weights do not "
                                   "belong together")
        elif shape != tuple(want):
            raise AdapterError(f"{key} has shape {shape} in {where} but the model's module needs "
                               f"{tuple(want)}; the adapter was trained on a different base model")
        if array.dtype.kind != "f":
            raise AdapterError(f"{key} in {where} has dtype {array.dtype}; adapter weights are floats")
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise AdapterError(f"{where} has no weight {missing[0]!r}"
                           f"{f' (and {len(missing) - 1} more missing)' if len(missing) > 1 else ''}; "
                           "the file does not match adapter_config.json: save the adapter again")


def _copy_in(peft_model, adapter_name: str, tensors: dict, directory: str) -> None:
    params = _adapter_param_names(peft_model, adapter_name)
    for key, array in tensors.items():
        p = params.get(key)
        if p is None:
            raise AdapterError(f"{os.path.join(directory, WEIGHTS_NAME)} has {key!r}, which this model "
                               "has no parameter for; was the adapter trained on a different model?")
        if tuple(array.shape) != p.shape:
            raise AdapterError(f"{key} has shape {tuple(array.shape)} in "
                               f"{os.path.join(directory, WEIGHTS_NAME)} but {p.shape} in the "
                               "model; the adapter was trained on a different base model")
        xpmod = backend.get_xp(p.data)
        p.data = xpmod.asarray(backend.to_device(array, backend.device_of(p.data)), dtype=p.data.dtype)


def _plan(plan, config: LoraConfig, directory: str):
    """``plan(config)`` (which modules the config adapts, and their rank and alpha), its refusals
    (targets that match nothing, a regex that runs too long) raised as AdapterError naming the
    adapter's config file."""
    try:
        resolved, lora_names, saved = plan(config)
        for name in lora_names if isinstance(resolved, LoraConfig) else ():   # (IA)³ has no rank
            # the rank/alpha patterns run here too, under the same check
            resolved.rank_for(name), resolved.alpha_for(name)
        return resolved, lora_names, saved
    except AdapterError:
        raise
    except ValueError as e:
        raise AdapterError(f"{os.path.join(directory, CONFIG_NAME)}: {e}") from None


def load_adapter_into(peft_model, directory, adapter_name: str, is_trainable: bool = False) -> None:
    """PeftModel.load_adapter: check, inject (inactive), copy the weights in."""
    directory = os.fspath(directory)
    config, tensors = read_adapter_dir(directory)
    config = dataclasses.replace(config, inference_mode=not is_trainable)
    if adapter_name in peft_model.peft_config:
        raise ValueError(f"an adapter called {adapter_name!r} already exists; load under another "
                         "name or delete_adapter() it first")
    resolved, lora_names, saved = _plan(peft_model.plan_injection, config, directory)
    _check_against_model(peft_model.base_model.model, resolved, tensors, directory, lora_names, saved)
    peft_model._inject(adapter_name, config)
    _copy_in(peft_model, adapter_name, tensors, directory)
    if not is_trainable:
        peft_model.eval()    # PEFT's load_adapter does the same for an adapter loaded to infer


def from_pretrained(cls, model, directory, adapter_name: str = "default", is_trainable: bool = False):
    """PeftModel.from_pretrained: everything is checked before ``model`` is modified."""
    directory = os.fspath(directory)
    config, tensors = read_adapter_dir(directory)
    config = dataclasses.replace(config, inference_mode=not is_trainable)
    if any(isinstance(m, (LoraLinear, IA3Linear, ModulesToSaveWrapper)) for m in model.modules()):
        raise ValueError("the model already contains LoRA or (IA)³ layers; call load_adapter on its "
                         "PeftModel instead of PeftModel.from_pretrained")
    resolved, lora_names, saved = _plan(lambda c: plan_adapter(model, c), config, directory)
    _check_against_model(model, resolved, tensors, directory, lora_names, saved)
    peft_model = cls(model, config, adapter_name)
    _copy_in(peft_model, adapter_name, tensors, directory)
    if not is_trainable:
        peft_model.eval()    # loaded for inference, as PEFT: dropout off, mixed batches allowed
    return peft_model


def adapter_size_bytes(directory) -> int:
    """Bytes on disk of an adapter directory (both files, every subfolder)."""
    total = 0
    for root, _, files in os.walk(os.fspath(directory)):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def is_adapter_dir(directory) -> bool:
    return os.path.isfile(os.path.join(os.fspath(directory), CONFIG_NAME))


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_adapters", "read_adapter_dir", "load_adapter_into",
           "from_pretrained", "get_peft_model_state_dict", "read_safetensors", "write_safetensors",
           "adapter_size_bytes", "is_adapter_dir", "AdapterError"]
