"""Folder-level atomic saves (minilora/fileio.py): old or new after kill -9, never a mix.

* A kill -9 loop for each kind of save (a model's ``save_pretrained``, an adapter's, ``minilora
  merge``'s merged folder): a child saves versions in a loop (tests/_savers.py: every version is
  recognisable from each file alone), is killed at a seeded random moment, and the folder must then
  load as one whole version (or not exist yet, before the first save finished). The next save
  removes the killed writer's temporaries.
* Two processes saving different versions to one folder while this process loads it in a loop:
  every load sees one version.
* Entries a save does not own (a tokenizer file, another adapter's subfolder) survive it, and a
  symbolic link in the folder is kept as a link, never written through; ``minilora merge`` refuses
  ``--out`` equal to ``--base`` or ``--adapter``.

``MINILORA_FUZZ_CASES`` (as in tests/test_fuzz_files.py) scales the kills: N // 3 per kind, 8 by
default; the counts are printed (``-s`` shows them).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import _savers
from minilora.fileio import atomic_folder

KILLS = max(int(os.environ.get("MINILORA_FUZZ_CASES", "24")) // 3, 3)
ROOT = Path(__file__).resolve().parent.parent
SAVER = Path(__file__).with_name("_savers.py")
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


def start_saver(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SAVER), *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def temporaries(folder: Path) -> list:
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


def kill_loop(folder: Path, version_of, saver_args, seed: int) -> tuple[int, set]:
    """Start a saver, kill -9 it at a random moment, check the folder; ``KILLS`` times. Returns
    (kills survived, versions seen)."""
    rnd, seen, survived = random.Random(seed), set(), 0
    for i in range(KILLS):
        proc = start_saver(*saver_args(i))
        time.sleep(rnd.uniform(1.0, 2.5))   # the child's imports take ~1 s, then it saves in a loop
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        if folder.exists():
            seen.add(version_of(folder))
        survived += 1
    return survived, seen


def test_model_save_is_old_or_new_after_kill_9(tmp_path):
    folder = tmp_path / "model"
    survived, seen = kill_loop(folder, _savers.version_of_model,
                               lambda i: ("model", folder, 1 + i * 1000, 1), seed=0)
    print(f"\nmodel saves: {survived} kills survived, {len(seen)} distinct versions found whole")
    assert len(seen) >= 2      # the loop did replace the folder, not only create it once
    _savers.model_version(7).save_pretrained(folder)   # the next save cleans up after the killed
    assert temporaries(folder) == [] and _savers.version_of_model(folder) == 7


def test_adapter_save_is_old_or_new_after_kill_9(tmp_path):
    folder = tmp_path / "adapter"
    survived, seen = kill_loop(folder, _savers.version_of_adapter,
                               lambda i: ("adapter", folder, 1 + i * 1000, 1), seed=1)
    print(f"\nadapter saves: {survived} kills survived, {len(seen)} distinct versions found whole")
    assert len(seen) >= 2


Q = "model.layers.0.self_attn.q_proj.weight"


def test_merged_save_is_old_or_new_after_kill_9(tmp_path):
    from minilora.commands.finetune import merge_adapter_into_base
    from minilora.models import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(**_savers.TINY)).save_pretrained(tmp_path / "base")
    expected = []
    for k in (1, 2):   # two adapters, and the merged q_proj each gives
        base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
        _savers.adapter_version(base, k).save_pretrained(tmp_path / f"adapter{k}")
        merged, _ = merge_adapter_into_base(tmp_path / f"adapter{k}", tmp_path / "probe", tmp_path / "base")
        expected.append(dict(merged.named_parameters())[Q].numpy())
    folder = tmp_path / "merged"

    def version_of(path):
        q = dict(LlamaForCausalLM.from_pretrained(path).named_parameters())[Q].numpy()
        return next(k for k, want in enumerate(expected) if np.array_equal(q, want))

    survived, seen = kill_loop(folder, version_of, lambda i: (
        "merged", folder, i, 1, tmp_path / "base", tmp_path / "adapter1", tmp_path / "adapter2"),
        seed=2)
    print(f"\nmerged saves: {survived} kills survived, versions {sorted(seen)} found whole")


def test_two_writers_and_a_reader_never_see_a_mix(tmp_path):
    folder = tmp_path / "model"
    _savers.model_version(1).save_pretrained(folder)
    writers = [start_saver("model", folder, 3, 2), start_saver("model", folder, 4, 2)]
    try:
        seen, loads, end = set(), 0, time.monotonic() + 8.0
        while time.monotonic() < end:
            seen.add(_savers.version_of_model(folder))   # raises on a mix
            loads += 1
    finally:
        for w in writers:
            w.kill()
            w.wait()
            w.stderr.close()
    print(f"\ntwo writers: {loads} loads, {len(seen)} distinct versions, never a mix")
    assert len({k % 2 for k in seen}) == 2 or len(seen) > 2, "the writers did not get to save"


def test_a_save_keeps_what_it_does_not_own_and_does_not_follow_links(tmp_path):
    from minilora.lora import LoraConfig, get_peft_model
    folder, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    _savers.model_version(1).save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")
    elsewhere.mkdir()
    os.symlink(elsewhere, folder / "other")
    _savers.model_version(2).save_pretrained(folder)
    assert (folder / "tokenizer.json").read_text() == "{}"
    assert (folder / "other").is_symlink() and _savers.version_of_model(folder) == 2

    peft = get_peft_model(_savers.model_version(3), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    peft.save_pretrained(tmp_path / "adapters", selected_adapters=["default"])
    os.symlink(elsewhere, tmp_path / "adapters" / "other")
    peft.save_pretrained(tmp_path / "adapters", selected_adapters=["other"])
    assert list(elsewhere.iterdir()) == []      # nothing was written through the link
    assert not (tmp_path / "adapters" / "other").is_symlink()
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()   # the default one is kept


def test_a_failed_save_changes_nothing(tmp_path):
    folder = tmp_path / "model"
    _savers.model_version(1).save_pretrained(folder)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_folder(folder) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("disk full")
    assert _savers.version_of_model(folder) == 1 and temporaries(folder) == []


def test_merge_refuses_out_equal_to_base_or_adapter(tmp_path):
    from minilora.commands.finetune import merge_adapter_into_base
    _savers.model_version(1).save_pretrained(tmp_path / "base")
    for out, flag in ((tmp_path / "base", "--base"), (tmp_path / "adapter", "--adapter"),
                      (tmp_path / "." / "base", "--base")):
        with pytest.raises(ValueError, match=f"same folder as {flag}") as e:
            merge_adapter_into_base(tmp_path / "adapter", out, tmp_path / "base")
        assert "\n" not in str(e.value)
    assert _savers.version_of_model(tmp_path / "base") == 1
