"""Fuzzing every loader with damaged copies of real files: refused in one line naming the file.

Real, loadable files are written first (a tiny Llama checkpoint in float32 and in bfloat16, a
sharded one, the same model as GGUF, a LoRA adapter, a byte-level BPE tokenizer.json), then damaged
by the generators in ``tests/_damage.py``: truncations at many offsets, byte flips in headers, JSON
mutations of every config field (type swaps, NaN, negatives, zero, huge sizes), dtype / offset /
shape lies in safetensors headers, GGUF header and metadata damage. Each damaged copy is loaded in a
child process capped at ``MEMORY_CAP`` bytes of address space (``resource.setrlimit(RLIMIT_AS)``)
and a ``CASE_TIMEOUT_S`` timeout per case. A case passes when it ends in the loader family's error
(``CheckpointError``, ``GGUFError``, ``AdapterError``, ``TokenizerError``) whose one-line message
names the path, or loads (damage that left a valid file, e.g. a flipped digit in a float); it fails
on any other exception, a multi-line message, a message without the path, a hang or a memory
blow-up.

Case counts are bounded and the seeds fixed, so the default run is repeatable and takes well under
two minutes on two cores. ``MINILORA_FUZZ_CASES=N`` (default 24) sets how many truncations and byte
flips each file gets (the JSON and header mutations are a fixed list, every field each time); e.g.
``MINILORA_FUZZ_CASES=400 python -m pytest tests/test_fuzz_files.py`` for a long run. The counts
tried by family are printed (``-s`` shows them).
"""
from __future__ import annotations

import json
import os
import queue
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import _damage
from minilora import backend
from minilora.models import LlamaConfig, LlamaForCausalLM

N_CASES = int(os.environ.get("MINILORA_FUZZ_CASES", "24"))
MEMORY_CAP = 3 << 30        # bytes of address space per child: far above a tiny model's needs
CASE_TIMEOUT_S = 20.0       # a case that has not answered by then is a hang
CHILD = Path(__file__).with_name("_damage.py")
ROOT = Path(__file__).resolve().parent.parent

TINY = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)


def run_cases(cases: list) -> list:
    """Load each (kind, path) in child processes; returns one outcome dict per case. A child that
    stops answering is killed and its current case recorded as "hang"; a child that dies (the
    memory cap) records "crash"; the remaining cases go to a fresh child."""
    results, todo = [None] * len(cases), list(range(len(cases)))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    while todo:
        batch = todo
        proc = subprocess.Popen([sys.executable, str(CHILD), str(MEMORY_CAP)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        proc.stdin.write(json.dumps([cases[i] for i in batch]))
        proc.stdin.close()
        lines = queue.Queue()     # a thread reads the child's lines, so a hang cannot block us
        threading.Thread(target=lambda out=proc.stdout: [*map(lines.put, out), lines.put(None)],
                         daemon=True).start()
        current, done = None, set()
        deadline = time.monotonic() + CASE_TIMEOUT_S + 10    # + the child's imports
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:       # no answer in time: a hang
                proc.kill()
                if current is not None and current not in done:
                    results[current] = {"outcome": "hang", "message": ""}
                    done.add(current)
                break
            if line is None:          # the child exited (finished, or died in ``current``)
                break
            msg = json.loads(line)
            if "start" in msg:
                current, deadline = batch[msg["start"]], time.monotonic() + CASE_TIMEOUT_S
            else:
                results[batch[msg["i"]]] = msg
                done.add(batch[msg["i"]])
        proc.wait()
        if current is not None and current not in done:
            results[current] = {"outcome": "crash", "message": f"exit code {proc.returncode}"}
            done.add(current)
        todo = [i for i in batch if i not in done]
    return results


def check(cases: list, labels: list, family: str) -> Counter:
    results = run_cases(cases)
    counts = Counter(r["outcome"] for r in results)
    bad = [(labels[i], r) for i, r in enumerate(results) if r["outcome"] not in ("refused", "loaded")]
    print(f"\n{family}: {len(cases)} damaged files, {dict(counts)}")
    assert not bad, f"{len(bad)} of {len(cases)} {family} cases ended wrongly, e.g. {bad[:3]}"
    return counts


# ------------------------------------------------------------------ the real files
@pytest.fixture(scope="module")
def tiny_model():
    backend.manual_seed(0)
    return LlamaForCausalLM(TINY)


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("originals")
    tiny_model.save_pretrained(root / "model")
    return root


def write_case(root: Path, i: int, files: dict) -> Path:
    """A folder ``root/case{i}`` holding ``files`` (name -> bytes)."""
    folder = root / f"case{i}"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def bf16_safetensors(tensors: dict) -> bytes:
    """A safetensors file of BF16 tensors (float32 rounded toward zero), written by hand."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, arr in tensors.items():
        raw = (np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
        header[name] = {"dtype": "BF16", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + raw.nbytes]}
        blobs.append(raw.tobytes())
        offset += raw.nbytes
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


# ------------------------------------------------------------------ model checkpoints
def test_damaged_checkpoints_are_refused_with_the_path(tmp_path, originals, tiny_model):
    config = (originals / "model" / "config.json").read_bytes()
    weights = (originals / "model" / "model.safetensors").read_bytes()
    bf16 = bf16_safetensors({n: p.data for n, p in tiny_model.named_parameters()})
    header_end = 8 + struct.unpack("<Q", weights[:8])[0]
    damaged = []
    for label, data in _damage.json_mutations(json.loads(config), seed=0):
        damaged.append((f"config.json {label}", {"config.json": data, "model.safetensors": weights}))
    for label, data in _damage.truncations(config, N_CASES, seed=1):
        damaged.append((f"config.json {label}", {"config.json": data, "model.safetensors": weights}))
    for name, blob in (("F32", weights), ("BF16", bf16)):
        end = 8 + struct.unpack("<Q", blob[:8])[0]
        gens = [_damage.truncations(blob, N_CASES, seed=2), _damage.byte_flips(blob, N_CASES, 3, end),
                _damage.safetensors_lies(blob, seed=4)]
        for gen in gens:
            for label, data in gen:
                damaged.append((f"{name} {label}", {"config.json": config, "model.safetensors": data}))
    nan = bytearray(weights)   # a float32 NaN in the first weight of the data section
    nan[header_end:header_end + 4] = struct.pack("<f", float("nan"))
    damaged.append(("a NaN weight", {"config.json": config, "model.safetensors": bytes(nan)}))
    cases = [("model", str(write_case(tmp_path, i, files))) for i, (_, files) in enumerate(damaged)]
    counts = check(cases, [label for label, _ in damaged], "model checkpoints")
    assert counts["refused"] > 0.8 * len(cases)     # almost every damage here must be caught


def test_damaged_shard_index_is_refused_with_the_path(tmp_path, originals):
    weights = (originals / "model" / "model.safetensors").read_bytes()
    config = (originals / "model" / "config.json").read_bytes()
    (n,) = struct.unpack("<Q", weights[:8])
    names = [k for k in json.loads(weights[8:8 + n]) if k != "__metadata__"]
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in names}}
    damaged = [(label, {"config.json": config, "model-00001-of-00001.safetensors": weights,
                        "model.safetensors.index.json": data})
               for label, data in _damage.json_mutations(index, seed=5)]
    for shard in ["../x.safetensors", "", "/etc/passwd", "model-00002-of-00002.safetensors"]:
        bad = {"weight_map": {**index["weight_map"], names[0]: shard}}
        damaged.append((f"shard {shard!r}", {"config.json": config, "model-00001-of-00001.safetensors":
                                             weights, "model.safetensors.index.json":
                                             json.dumps(bad).encode()}))
    cases = [("model", str(write_case(tmp_path, i, files))) for i, (_, files) in enumerate(damaged)]
    check(cases, [label for label, _ in damaged], "shard indexes")


# ------------------------------------------------------------------ GGUF
def test_damaged_gguf_files_are_refused_with_the_path(tmp_path, tiny_model):
    from test_gguf import write_model_as_gguf
    write_model_as_gguf(tiny_model, tmp_path / "ok.gguf")
    data = (tmp_path / "ok.gguf").read_bytes()
    from minilora.gguf import GGUFFile
    data_offset = GGUFFile(tmp_path / "ok.gguf").data_offset
    damaged = [*_damage.truncations(data, 2 * N_CASES, seed=6),
               *_damage.byte_flips(data, 4 * N_CASES, seed=7, region=data_offset)]
    cases = []
    for i, (_, blob) in enumerate(damaged):
        path = tmp_path / f"case{i}.gguf"
        path.write_bytes(blob)
        cases += [("gguf", str(path)), ("gguf-reader", str(path))]
    labels = [label for label, _ in damaged for _ in range(2)]
    check(cases, labels, "GGUF files")


def test_gguf_metadata_lies_are_refused_with_the_path(tmp_path, tiny_model):
    from test_gguf import F32, STRING, U32, write_model_as_gguf
    changes = {"llama.embedding_length": [(U32, 0), (U32, 10**9), (F32, float("nan")), (STRING, "16")],
               "llama.block_count": [(U32, 0), (U32, 10**6), (U32, 1), (U32, 3)],
               "llama.attention.head_count": [(U32, 0), (U32, 3), (U32, 10**9)],
               "llama.attention.head_count_kv": [(U32, 0), (U32, 2**31)],
               "llama.feed_forward_length": [(U32, 0), (U32, 10**9)],
               "llama.context_length": [(U32, 0), (STRING, "x")],
               "llama.attention.layer_norm_rms_epsilon": [(F32, float("nan")), (F32, -1.0), (F32, 0.0)],
               "llama.rope.freq_base": [(F32, float("inf")), (F32, 0.0), (F32, -5.0)],
               "general.alignment": [(U32, 0), (U32, 3), (STRING, "32")],
               "general.architecture": [(STRING, "gpt2"), (U32, 1)]}
    cases, labels = [], []
    for key, values in changes.items():
        for j, value in enumerate(values):
            path = tmp_path / f"{key}-{j}.gguf"
            write_model_as_gguf(tiny_model, path, **{key: value})
            cases.append(("gguf", str(path)))
            labels.append(f"{key}={value}")
    counts = check(cases, labels, "GGUF metadata")
    assert counts["refused"] == len(cases)


# ------------------------------------------------------------------ adapters
def test_damaged_adapters_are_refused_with_the_path(tmp_path, originals, tiny_model):
    from minilora.lora import LoraConfig, get_peft_model
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(originals / "model"),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(tmp_path / "adapter")
    config = (tmp_path / "adapter" / "adapter_config.json").read_bytes()
    weights = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    end = 8 + struct.unpack("<Q", weights[:8])[0]
    obj = json.loads(config)
    mutated = dict(obj)
    damaged = [(label, {"adapter_config.json": data, "adapter_model.safetensors": weights})
               for label, data in _damage.json_mutations(obj, seed=8, values=_damage.JSON_SWAPS)]
    for label, pattern in [("catastrophic target regex", r"(a|aa)+$"),
                           ("catastrophic nested", r"(.*a){25}x"), ("invalid regex", "(")]:
        mutated["target_modules"] = pattern
        damaged.append((label, {"adapter_config.json": json.dumps(mutated).encode(),
                                "adapter_model.safetensors": weights}))
    mutated = {**obj, "rank_pattern": {"(x+x+)+y": 2}}
    damaged.append(("catastrophic rank_pattern", {"adapter_config.json": json.dumps(mutated).encode(),
                                                  "adapter_model.safetensors": weights}))
    for gen in [_damage.truncations(weights, N_CASES, seed=9),
                _damage.byte_flips(weights, N_CASES, 10, end), _damage.safetensors_lies(weights, seed=11)]:
        damaged += [(f"weights {label}", {"adapter_config.json": config,
                                          "adapter_model.safetensors": data}) for label, data in gen]
    damaged += [(f"config {label}", {"adapter_config.json": data, "adapter_model.safetensors": weights})
                for label, data in _damage.truncations(config, N_CASES, seed=12)]
    cases = []
    for i, (_, files) in enumerate(damaged):
        folder = write_case(tmp_path, i, files)
        os.symlink(originals / "model", str(folder) + ".base")
        cases.append(("adapter", str(folder)))
    counts = check(cases, [label for label, _ in damaged], "adapters")
    assert counts["refused"] > 0.5 * len(cases)   # informational keys (revision, ...) may change


# ------------------------------------------------------------------ tokenizers
def test_damaged_tokenizer_files_are_refused_with_the_path(tmp_path):
    from test_bpe import BYTE_LEVEL, tiny_tokenizer, write_tokenizer_json
    write_tokenizer_json(tmp_path / "ok", tiny_tokenizer(), BYTE_LEVEL,
                         config={"eos_token": "<|end|>", "chat_template": "{{ messages[0].content }}"})
    spec = json.loads((tmp_path / "ok" / "tokenizer.json").read_text())
    config = (tmp_path / "ok" / "tokenizer_config.json").read_bytes()
    text = json.dumps(spec).encode()
    damaged = [(label, {"tokenizer.json": data, "tokenizer_config.json": config})
               for label, data in [*_damage.json_mutations(spec, seed=13, values=_damage.JSON_SWAPS),
                                   *_damage.truncations(text, N_CASES, seed=14),
                                   *_damage.byte_flips(text, N_CASES, seed=15, region=400)]]
    for key in ("type", "vocab", "merges", "unk_token", "byte_fallback"):   # inside "model"
        for value in _damage.JSON_SWAPS:
            bad = {**spec, "model": {**spec["model"], key: value}}
            damaged.append((f"model.{key}={value!r}", {"tokenizer.json": json.dumps(bad).encode(),
                                                       "tokenizer_config.json": config}))
    for template in ["{% for %}", "{{ ''.__class__ }}", 42, ["no name"]]:
        bad_config = json.dumps({"chat_template": template}).encode()
        damaged.append((f"chat_template={template!r}", {"tokenizer.json": text,
                                                        "tokenizer_config.json": bad_config}))
    cases = [("tokenizer", str(write_case(tmp_path, i, files))) for i, (_, files) in enumerate(damaged)]
    check(cases, [label for label, _ in damaged], "tokenizers")
