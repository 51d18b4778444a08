"""Child processes for tests/test_atomic_saves.py: save versions of a model or adapter in a loop.

``python tests/_savers.py KIND FOLDER START STEP [BASE ADAPTERS...]`` saves version START, then
START + STEP, ... forever (until killed). Every version k is recognisable from either file alone:

* ``model``: a tiny Llama whose config has ``initializer_range = k / 1000`` and
  ``tie_word_embeddings = k % 2 == 1`` (the mix the review found loading silently with a wrongly
  tied head), every weight equal to k;
* ``adapter``: a LoRA adapter with ``lora_alpha = k`` and rank 2 or 4 (k odd or even), every
  factor equal to k;
* ``merged``: ``merge_adapter_into_base(ADAPTERS[k % len(ADAPTERS)], FOLDER, BASE)``.

``version_of_model(folder)`` / ``version_of_adapter(folder)`` load a folder and return k, raising
AssertionError when its files come from different versions.
"""
from __future__ import annotations

import itertools
import sys

import numpy as np

from minilora.lora import LoraConfig, get_peft_model
from minilora.models import LlamaConfig, LlamaForCausalLM

TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)


def model_version(k: int) -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig(**TINY, initializer_range=k / 1000,
                                         tie_word_embeddings=k % 2 == 1))
    for _, p in model.named_parameters():
        p.data = np.full(p.shape, k, dtype=np.float32)
    return model


def adapter_version(base: LlamaForCausalLM, k: int):
    peft = get_peft_model(base, LoraConfig(r=2 if k % 2 else 4, lora_alpha=k,
                                           target_modules=["q_proj", "v_proj"]))
    for name, p in peft.named_parameters():
        if "lora_" in name:
            p.data = np.full(p.shape, k, dtype=np.float32)
    return peft


def version_of_model(folder) -> int:
    model = LlamaForCausalLM.from_pretrained(folder)
    k = round(model.config.initializer_range * 1000)
    assert model.config.tie_word_embeddings == (k % 2 == 1), f"config of {k} with another head"
    values = {float(v) for _, p in model.named_parameters() for v in np.unique(p.data)}
    assert values == {float(k)}, f"config of version {k} with weights {sorted(values)[:4]}"
    return k


def version_of_adapter(folder) -> int:
    from minilora.lora.io import read_adapter_dir
    config, tensors = read_adapter_dir(folder)
    k = round(config.lora_alpha)
    assert config.r == (2 if k % 2 else 4), f"alpha of version {k} with rank {config.r}"
    for key, a in tensors.items():
        assert np.all(a == k), f"config of version {k} with {key} = {a.flat[0]}"
        if ".lora_A." in key:
            assert a.shape[0] == config.r, f"rank {config.r} in the config, {a.shape[0]} in {key}"
    return k


def main(kind: str, folder: str, start: int, step: int, *rest: str) -> None:
    if kind == "merged":
        from minilora.commands.finetune import merge_adapter_into_base
        base, adapters = rest[0], rest[1:]
        for k in itertools.count(start, step):
            merge_adapter_into_base(adapters[k % len(adapters)], folder, base)
    base = LlamaForCausalLM(LlamaConfig(**TINY)) if kind == "adapter" else None
    for k in itertools.count(start, step):
        if kind == "model":
            model_version(k).save_pretrained(folder)
        else:
            peft = adapter_version(base, k)
            peft.save_pretrained(folder)
            base = peft.unload()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:])
