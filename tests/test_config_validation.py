"""Checkpoint and adapter files are checked before anything is built from them.

config.json's fields are type- and range-checked (one-line ``CheckpointError`` naming the file and
the field); sizes are compared with the weights file's header before any weight is allocated (a
config claiming 10**9-wide layers is refused at once); a model loaded from a checkpoint draws no
random numbers; NaN or infinite weights are refused by tensor name unless ``allow_nonfinite=True``;
a safetensors header whose offsets overlap is refused (the BF16 path included); an adapter's
regexes run under a time bound, and every adapter refusal names the file. The rename-aside fallback
of ``fileio.atomic_folder`` (where renameat2 is unavailable) is recovered on the next load.
"""
from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest

import _savers
from minilora import backend, fileio
from minilora.lora import AdapterError, LoraConfig, PeftModel, get_peft_model
from minilora.models import CheckpointError, LlamaConfig, LlamaForCausalLM


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "model"
    _savers.model_version(2).save_pretrained(folder)
    return folder


def edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


@pytest.mark.parametrize("field, value, expected", [
    ("hidden_size", 0, "an integer >= 1"), ("hidden_size", 128.0, "an integer >= 1"),
    ("hidden_size", "16", "an integer >= 1"), ("num_hidden_layers", -1, "an integer >= 1"),
    ("vocab_size", True, "an integer >= 1"), ("rms_norm_eps", float("nan"), "a finite number > 0"),
    ("rms_norm_eps", -1e-6, "a finite number > 0"), ("rope_theta", 0, "a finite number > 0"),
    ("rope_theta", -10000.0, "a finite number > 0"),
    ("tie_word_embeddings", "false", "true or false"), ("pad_token_id", [], "null or an integer"),
])
def test_a_bad_field_is_refused_naming_file_and_field(checkpoint, field, value, expected):
    path = edit_config(checkpoint, **{field: value})
    with pytest.raises(CheckpointError) as e:
        LlamaForCausalLM.from_pretrained(checkpoint)
    msg = str(e.value)
    assert str(path) in msg and field in msg and expected in msg and "\n" not in msg


@pytest.mark.parametrize("document", ["[1, 2]", '"llama"', "42"])
def test_a_config_that_is_not_an_object_is_refused(checkpoint, document):
    (checkpoint / "config.json").write_text(document)
    with pytest.raises(CheckpointError, match="expected an object"):
        LlamaForCausalLM.from_pretrained(checkpoint)


@pytest.mark.parametrize("field, value", [("hidden_size", 10**9), ("vocab_size", 10**9),
                                          ("num_hidden_layers", 10**6), ("intermediate_size", 10**9)])
def test_huge_sizes_are_refused_against_the_header_before_allocating(checkpoint, field, value):
    changes = {field: value}
    if field == "hidden_size":
        changes["num_attention_heads"] = changes["num_key_value_heads"] = 1
        changes["head_dim"] = value
    edit_config(checkpoint, **changes)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=str(checkpoint / "model.safetensors")):
        LlamaForCausalLM.from_pretrained(checkpoint)
    assert time.perf_counter() - start < 2.0     # no gigabytes were allocated (or filled)


def test_loading_draws_no_random_numbers(checkpoint):
    backend.manual_seed(123)
    before = backend.rng().bit_generator.state
    LlamaForCausalLM.from_pretrained(checkpoint)
    assert backend.rng().bit_generator.state == before
    LlamaForCausalLM(LlamaConfig(**_savers.TINY))        # a fresh model still draws its init
    assert backend.rng().bit_generator.state != before


def test_non_finite_weights_are_refused_by_name_unless_allowed(tmp_path):
    model = _savers.model_version(2)
    w = dict(model.named_parameters())["model.norm.weight"]
    w.data[3] = np.inf
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' holds NaN or infinity"):
        LlamaForCausalLM.from_pretrained(tmp_path / "m")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "m", allow_nonfinite=True)
    assert np.isinf(dict(loaded.named_parameters())["model.norm.weight"].numpy()[3])


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_overlapping_offsets_are_refused(checkpoint, dtype):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    for name, info in header.items():
        if name != "__metadata__":
            info["dtype"] = dtype
    first = next(k for k in header if k != "__metadata__")
    lo, hi = header[first]["data_offsets"]
    header[first]["data_offsets"] = [lo + 4, hi + 4]       # into the next tensor's bytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match=str(path)):
        LlamaForCausalLM.from_pretrained(checkpoint)


@pytest.fixture
def adapter(tmp_path):
    base = LlamaForCausalLM(LlamaConfig(**_savers.TINY))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    return tmp_path / "a"


@pytest.mark.parametrize("changes, expected", [
    # (.|\w)* can split "model.layers.0.self_attn.q_proj" in exponentially many ways, and the
    # final \d never matches: each try backtracks through all of them
    ({"target_modules": r"(.|\w)*\d$"}, "ran longer than"),
    ({"rank_pattern": {r"(.|\w)*\d": 4}}, "ran longer than"),
    ({"target_modules": "("}, "not a valid regex"), ({"r": "8"}, "r must be a positive integer"),
    ({"use_rslora": "false"}, "use_rslora"), ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"target_modules": ["nothing_like_it"]}, "matched no Linear layer"),
])
def test_adapter_refusals_name_the_file_and_regexes_are_time_bound(adapter, changes, expected):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    base = LlamaForCausalLM(LlamaConfig(**_savers.TINY))
    start = time.perf_counter()
    with pytest.raises(AdapterError) as e:
        PeftModel.from_pretrained(base, adapter)
    msg = str(e.value)
    assert str(path) in msg and expected in msg and "\n" not in msg
    assert time.perf_counter() - start < 30


def test_a_catastrophic_pattern_times_out_on_a_long_name():
    from minilora.lora.config import matches
    config = LoraConfig(target_modules=r"(.|\w)*\d$")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="ran longer than"):
        matches(config, "model.layers.0.self_attn.q_proj")
    assert time.perf_counter() - start < 5


def test_rename_aside_fallback_is_recovered(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    _savers.model_version(1).save_pretrained(folder)
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)   # no renameat2 here
    _savers.model_version(3).save_pretrained(folder)
    assert _savers.version_of_model(folder) == 3
    # a crash between the two renames: the old tree aside, nothing under the name
    aside = tmp_path / ".model.minilora-old.999999999.x"
    aside.mkdir()
    folder.rename(aside / "tree")
    assert _savers.version_of_model(folder) == 3               # the load renames it back
