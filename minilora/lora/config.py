"""LoraConfig: which layers get an adapter, how big it is, and how it starts, with PEFT's fields.

The fields, their meanings and the JSON written to ``adapter_config.json`` follow Hugging Face PEFT's
``LoraConfig`` (peft 0.21), so a config written here is read by PEFT and the reverse
(PEFT's ``LoraConfig`` documentation). The hyperparameters of the LoRA paper (Hu et al., 2021):

* ``r``: the rank of the update ΔW = B·A, with A: (r, in_features) and B: (out_features, r);
* ``lora_alpha``: the update is scaled by α/r (α/√r with ``use_rslora``, Kalajdzievski 2023), so that
  changing r does not change how large the update starts out;
* ``lora_dropout``: dropout on the adapter's input only (the frozen path sees x unchanged);
* ``target_modules``: which Linear layers get an adapter (see ``matches``);
* ``init_lora_weights``: True = A ~ U(-1/√in, 1/√in) (kaiming-uniform, PEFT's default) and B = 0, so
  the adapted model starts out computing exactly what the base model computes; "gaussian" = A ~
  N(0, (1/r)²) (PEFT's std = 1/r) and B = 0; False = A and B both random (a nonzero update from the
  start: for tests and demonstrations only); "pissa", "pissa_niter_K", "olora" and "loftq" (with
  ``loftq_config``) start the adapter from W0 and change the base weight (``lora/init.py``).

The user's regular expressions (a ``target_modules`` string, the keys of ``rank_pattern`` and
``alpha_pattern``, ``layers_pattern``) run with a time bound (``REGEX_TIMEOUT_S``, the ``regex``
package's ``timeout=``): a pattern that backtracks catastrophically on a module name is refused
with a one-line error instead of hanging a load or ``minilora merge``. ``AdapterError`` is the error
family of adapter files: ``LoraConfig.from_json_file`` and ``lora/io.py`` raise it, naming the file.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields

import regex

from .init import INIT_FROM_BASE, check_loftq_config, parse_init


class AdapterError(ValueError):
    """An adapter folder whose files cannot be loaded (one line: the file, the field, what was
    expected)."""


# The longest one match of a user's pattern against one module name may take. Module names are
# short (< 100 characters): a sane pattern matches in microseconds, so a quarter second only ever
# stops a pattern that backtracks exponentially, and a model's ~200 names stay under a minute even
# if every one came close.
REGEX_TIMEOUT_S = 0.25
MAX_CONFIG_BYTES = 16_000_000   # an adapter_config.json is a few KB; anything this large is damage


def _user_match(kind: str, pattern: str, name: str, full: bool = False):
    """``regex`` (full)match of the user's ``pattern`` against ``name``, refused with a ValueError
    (``kind`` names the field and its value) when it runs past ``REGEX_TIMEOUT_S``."""
    try:
        if full:
            return regex.fullmatch(pattern, name, timeout=REGEX_TIMEOUT_S)
        return regex.match(pattern, name, timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        raise ValueError(f"{kind} ran longer than {REGEX_TIMEOUT_S} s on module name {name!r}; "
                         "expected a regex without catastrophic backtracking "
                         "(nested repeats such as (a+)+): simplify it") from None


def _check_regex(kind: str, pattern) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"LoraConfig: {kind} has {pattern!r}; expected a non-empty regex string")
    try:
        regex.compile(pattern)
    except (regex.error, re.error, ValueError, OverflowError) as e:   # OverflowError: huge repeats
        raise ValueError(f"LoraConfig: {kind} {pattern!r} is not a valid regex ({e})") from None


# What get_peft_model uses when target_modules is None: PEFT's default for Llama (attention q and v,
# the choice of the LoRA paper's GPT-3 experiments).
DEFAULT_TARGET_MODULES = ["q_proj", "v_proj"]

VALID_BIAS = ("none", "all", "lora_only")
VALID_INIT = (True, False, "gaussian") + INIT_FROM_BASE   # the last four: lora/init.py

# Keys PEFT 0.21 writes in adapter_config.json that minilora has no feature for: they are written with
# PEFT's "off" value, and a file that turns one on is refused (silently ignoring it would load a
# different adapter from the one that was trained).
_UNSUPPORTED_OFF = {
    "fan_in_fan_out": False, "lora_bias": False, "use_qalora": False,
    "layer_replication": None, "exclude_modules": None, "target_parameters": None,
    "trainable_token_indices": None, "megatron_config": None, "eva_config": None,
    "corda_config": None, "alora_invocation_tokens": None, "arrow_config": None,
    "kasa_config": None, "lora_ga_config": None, "monteclora_config": None, "use_bdlora": None,
    "velora_config": None,
}
# Keys PEFT writes that carry no meaning for the weights (informational); read and dropped.
_INFORMATIONAL = {"auto_mapping": None, "megatron_core": "megatron.core", "qalora_group_size": 16,
                  "ensure_weight_tying": False, "peft_version": None}


@dataclass
class LoraConfig:
    """The hyperparameters of one LoRA adapter, with the names and meanings of PEFT's ``LoraConfig``.

    ``target_modules``: a list of names matched as *suffixes* of dotted module names ("q_proj" matches
    "model.layers.0.self_attn.q_proj"), a regex string that must match the *whole* dotted name (as in
    PEFT), "all-linear" (every Linear except the output head ``lm_head``), or None (Llama's default,
    ``["q_proj", "v_proj"]``). ``layers_to_transform`` (an int or a list of ints) keeps only the
    modules inside those decoder layers (the ``layers.{i}.`` index; ``layers_pattern`` renames
    "layers"). ``modules_to_save`` lists whole modules (e.g. "lm_head") trained fully and saved with
    the adapter, each entry matched as a plain suffix of the dotted name as in PEFT ("norm" is also
    every "...input_layernorm"). ``bias``: "none" trains no bias, "all" every bias, "lora_only" the
    biases of the adapted layers. ``rank_pattern`` / ``alpha_pattern`` override r / α for modules whose name ends
    with a key (PEFT's per-module ranks). ``use_dora``: DoRA (Liu et al. 2024), a trained magnitude
    per output row on top of the LoRA direction (``lora/dora.py``).
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list | str | None = None
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: int | list | None = None
    layers_pattern: str | list | None = None
    modules_to_save: list | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    task_type: str | None = "CAUSAL_LM"
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_type: str = "LORA"
    # DoRA (Liu et al. 2024): also learn a magnitude per output row, W' = m·(W0 + ΔW)/‖W0 + ΔW‖
    use_dora: bool = False
    # LoftQ (init_lora_weights="loftq"): {"loftq_bits": 4, "loftq_iter": N}, PEFT's LoftQConfig
    loftq_config: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig: r must be a positive integer (the rank of B·A), got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha):
            raise ValueError(f"LoraConfig: lora_alpha must be a number (the update is scaled by "
                             f"lora_alpha / r), got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("use_rslora", "inference_mode", "use_dora"):
            if not isinstance(getattr(self, name), bool):   # JSON "false" is a truthy string
                raise ValueError(f"LoraConfig: {name} is {getattr(self, name)!r}; expected true or "
                                 "false (a boolean, not a string)")
        if self.bias not in VALID_BIAS:
            raise ValueError(f"LoraConfig: bias={self.bias!r} is not one of {VALID_BIAS}")
        if not (self.init_lora_weights is True or self.init_lora_weights is False
                or self.init_lora_weights == "gaussian" or parse_init(self.init_lora_weights)):
            raise ValueError(f"LoraConfig: init_lora_weights={self.init_lora_weights!r} is not "
                             "supported; use True (kaiming-uniform A, zero B), 'gaussian', False, "
                             "'pissa', 'pissa_niter_K' (K a positive int), 'olora' or 'loftq'")
        if self.loftq_config is None:
            self.loftq_config = {}
        if self.init_lora_weights == "loftq":
            self.loftq_config = check_loftq_config(self.loftq_config)
            scale = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
            if scale != 1 or self.rank_pattern or self.alpha_pattern:
                warnings.warn(f"LoraConfig: LoftQ with scaling {scale:g} (lora_alpha / r, or per-module "
                              "patterns): minilora keeps W0 ≈ Q + scaling·B·A, while PEFT 0.21 splits "
                              "without the scaling, so PEFT would rebuild a different base for this "
                              "adapter; set lora_alpha = r (scaling 1) for files both load alike")
        elif self.loftq_config:   # PEFT's rule: the config only means something for "loftq"
            warnings.warn("LoraConfig: loftq_config is ignored unless init_lora_weights='loftq'")
            self.loftq_config = {}
        if self.peft_type != "LORA":
            raise ValueError(f"LoraConfig: peft_type={self.peft_type!r}; minilora only has LoRA "
                             "adapters (peft_type 'LORA')")
        self.target_modules = _normalise_targets(self.target_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            if not all(isinstance(m, str) and m for m in self.modules_to_save):
                raise ValueError(f"LoraConfig: modules_to_save must be a list of module names, got "
                                 f"{self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        lt = self.layers_to_transform
        if lt is not None:
            items = [lt] if isinstance(lt, int) and not isinstance(lt, bool) else lt
            if not isinstance(items, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
                raise ValueError(f"LoraConfig: layers_to_transform must be a layer index or a list of "
                                 f"them (ints >= 0), got {lt!r}")
            if isinstance(self.target_modules, str):
                raise ValueError("LoraConfig: layers_to_transform cannot be used when target_modules "
                                 "is a regex string (as in PEFT); put the layer indices in the regex "
                                 "or pass target_modules as a list")
            self.layers_to_transform = items if isinstance(items, int) else list(items)
        for name in ("rank_pattern", "alpha_pattern"):
            if getattr(self, name) is None:
                setattr(self, name, {})
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"LoraConfig: {name} must be a dict of module-name suffix -> value")
        for k, v in self.rank_pattern.items():
            _check_regex("rank_pattern key", k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"LoraConfig: rank_pattern[{k!r}]={v!r}; ranks must be positive ints")
        for k, v in self.alpha_pattern.items():
            _check_regex("alpha_pattern key", k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"LoraConfig: alpha_pattern[{k!r}]={v!r}; expected a finite number")
        lp = self.layers_pattern
        if lp is not None:
            for p in lp if isinstance(lp, list) and lp else [lp]:
                _check_regex("layers_pattern", p)
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ValueError(f"LoraConfig: task_type={self.task_type!r}; minilora's models are causal "
                             "language models: use 'CAUSAL_LM' (or None)")

    # ------------------------------------------------------------------ per-module values
    def rank_for(self, module_name: str) -> int:
        """r for this module: ``rank_pattern``'s value when a key matches its name's end, else r."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        """The adapter_config.json contents: PEFT's keys with PEFT's types (lists, not tuples)."""
        d = asdict(self)
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(d["target_modules"])  # PEFT keeps a set; sort for stable files
        d.update(_UNSUPPORTED_OFF)
        d.update({k: v for k, v in _INFORMATIONAL.items() if k != "peft_version"})
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        """Read an adapter_config.json dict (PEFT's or ours); refuse features minilora lacks."""
        if not isinstance(d, dict):
            raise ValueError(f"adapter config must be a JSON object, got {type(d).__name__}")
        peft_type = d.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"adapter config has peft_type {peft_type!r}, not 'LORA'; minilora loads "
                             "LoRA adapters only")
        for key, off in _UNSUPPORTED_OFF.items():
            value = d.get(key, off)
            if value not in (off, None, {}, [], False):
                raise ValueError(f"adapter config sets {key}={value!r}, a PEFT feature minilora does "
                                 "not implement; use an adapter trained without it")
        names = {f.name for f in fields(cls)}
        known = names | set(_UNSUPPORTED_OFF) | set(_INFORMATIONAL)
        unknown = sorted(k for k in d if k not in known)
        if unknown:
            raise ValueError(f"adapter config has keys minilora does not know: {unknown}; it may come "
                             "from a newer PEFT: remove them if they are off/default")
        kwargs = {k: v for k, v in d.items() if k in names}
        return cls(**kwargs)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json_file(cls, path) -> "LoraConfig":
        """The checked config in ``path``; every problem is an ``AdapterError`` naming the file."""
        try:
            size = os.path.getsize(path)
            if size > MAX_CONFIG_BYTES:
                raise AdapterError(f"{path} is {size} bytes; expected an adapter config of a few KB")
            with open(path, "rb") as f:
                d = json.loads(f.read().decode("utf-8"))
        except (ValueError, RecursionError) as e:
            if isinstance(e, AdapterError):
                raise
            raise AdapterError(f"{path} is not valid JSON ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''}); re-save the "
                               "adapter") from None
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise AdapterError(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None


def _normalise_targets(t):
    """None, "all-linear", a regex string, or a de-duplicated list of names."""
    if t is None or isinstance(t, str):
        if isinstance(t, str):
            if not t:
                raise ValueError("LoraConfig: target_modules is an empty string; give module names, "
                                 "a regex or 'all-linear'")
            if t != "all-linear":
                _check_regex("target_modules", t)
        return t
    if isinstance(t, (list, tuple, set, frozenset)):
        items = list(t) if not isinstance(t, (set, frozenset)) else sorted(t)
        if not items or not all(isinstance(s, str) and s for s in items):
            raise ValueError(f"LoraConfig: target_modules must be a non-empty list of module names, "
                             f"got {t!r}")
        return list(dict.fromkeys(items))  # drop repeats, keep order
    raise ValueError(f"LoraConfig: target_modules must be a list of names, a regex string or "
                     f"'all-linear', got {type(t).__name__}")


def _pattern_key(patterns: dict, module_name: str):
    """The first key of ``patterns`` that matches the end of ``module_name`` (PEFT's get_pattern_key)."""
    for key in patterns:
        if _user_match(f"rank_pattern/alpha_pattern key {key!r}", rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _layer_index(module_name: str, layers_pattern) -> int | None:
    """The decoder-layer index in a dotted name ("model.layers.3.mlp.up_proj" -> 3), as PEFT finds it:
    the first number after ``layers_pattern`` (default: the first numbered component)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
        return int(m.group("idx")) if m else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        m = _user_match(f"layers_pattern {pattern!r}", rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_name)
        if m:
            return int(m.group("idx"))
    return None


def matches(config: LoraConfig, module_name: str, targets=None) -> bool:
    """Does ``config`` put an adapter on the module called ``module_name``? (PEFT's rules.)

    ``targets`` overrides ``config.target_modules`` (get_peft_model passes the resolved default or the
    expanded "all-linear" list). A regex string must match the whole name; a list matches a name equal
    to an entry or ending in "." + entry, then ``layers_to_transform`` keeps only the listed layers.
    Modules named in ``modules_to_save`` (an entry is a suffix of the dotted name, PEFT's rule)
    and everything inside them never get an adapter (they are trained whole instead).
    """
    targets = config.target_modules if targets is None else targets
    if config.modules_to_save:
        parts = module_name.split(".")
        enclosing = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]   # the module and its parents
        if any(name.endswith(m) for name in enclosing for m in config.modules_to_save):
            return False     # inside a module trained whole (PEFT's suffix rule, as plan_injection)
    if isinstance(targets, str):
        return _user_match(f"target_modules {targets!r}", targets, module_name, full=True) is not None
    found = module_name in targets or any(module_name.endswith("." + t) for t in targets)
    if found and config.layers_to_transform is not None:
        wanted = config.layers_to_transform
        wanted = [wanted] if isinstance(wanted, int) else wanted
        idx = _layer_index(module_name, config.layers_pattern)
        found = idx is not None and idx in wanted
    return found
