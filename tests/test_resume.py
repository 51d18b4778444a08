"""Resuming a run: interrupted (by a return, Ctrl-C or SIGKILL) and resumed, it is the uninterrupted
run bit for bit: every parameter and the whole loss history compared with array_equal, with LoRA
dropout > 0 so that the generators' states matter, with an iterator of batches (its position is
replayed) and with a ``step -> batch`` function drawing from a named NumPy Generator."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _children import sigint_by_default  # noqa: E402
from minilora import backend
from minilora.lora import LoraConfig, get_peft_model
from minilora.models import LlamaConfig, LlamaForCausalLM
from minilora.optim import AdamW, LambdaLR, WarmupCosine
from minilora.resume import ResumeError, list_checkpoints
from minilora.train import TrainingInterrupted, train

CFG = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
           num_attention_heads=2, max_position_embeddings=16, pad_token_id=None)
STEPS = 12


def lora_run(seed=0):
    """A seeded LoRA model (dropout 0.3: every step draws masks from backend.rng()), its AdamW and
    schedule, and an endless iterator of batches drawn from its own Generator."""
    backend.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(**CFG))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                            target_modules=["q_proj", "v_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(params, lr=1e-2, weight_decay=0.01)
    sched = LambdaLR(opt, WarmupCosine(3, STEPS))
    data = np.random.default_rng(seed + 7)

    def batches():
        while True:
            ids = data.integers(0, 32, (4, 8))
            yield ids, ids.copy()
    return model, opt, sched, batches()


def snapshot(model):
    return {n: p.data.copy() for n, p in model.named_parameters()}


def assert_same_run(model_a, hist_a, model_b, hist_b):
    a, b = snapshot(model_a), snapshot(model_b)
    assert a.keys() == b.keys()
    for n in a:
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)
    np.testing.assert_array_equal([h["loss"] for h in hist_a], [h["loss"] for h in hist_b])
    np.testing.assert_array_equal([h["lr"] for h in hist_a], [h["lr"] for h in hist_b])
    assert [h["step"] for h in hist_b] == list(range(1, len(hist_b) + 1))


def test_stopped_and_resumed_lora_run_equals_the_uninterrupted_one(tmp_path):
    model, opt, sched, data = lora_run()
    full = train(model, data, opt, STEPS, scheduler=sched, progress=False, data_parallel=False)

    model2, opt2, sched2, data2 = lora_run()
    train(model2, data2, opt2, 5, scheduler=sched2, progress=False, data_parallel=False,
          checkpoint_dir=tmp_path / "ck")
    assert [c.name for c in list_checkpoints(tmp_path / "ck")] == ["checkpoint-000005"]
    # a new process would build everything again from the same seed: so do we
    model3, opt3, sched3, data3 = lora_run()
    resumed = train(model3, data3, opt3, STEPS, scheduler=sched3, progress=False,
                    data_parallel=False, resume_from=tmp_path / "ck")
    assert_same_run(model, full, model3, resumed)
    # the dropout masks matter: without the generators' states the run differs
    model4, opt4, sched4, data4 = lora_run()
    train(model4, data4, opt4, 5, scheduler=sched4, progress=False, data_parallel=False)
    rest = train(model4, data4, opt4, STEPS - 5, scheduler=sched4, progress=False,
                 data_parallel=False, seed=123)
    assert [h["loss"] for h in rest] != [h["loss"] for h in full[5:]]


def test_resume_with_a_step_function_and_a_named_generator(tmp_path):
    def run(steps, **kw):
        backend.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**CFG))
        opt = AdamW(model.parameters(), lr=1e-2)
        data = np.random.default_rng(3)

        def batch(step):
            ids = data.integers(0, 32, (4, 8))
            return ids, ids.copy()
        hist = train(model, batch, opt, steps, progress=False, rngs={"data": data},
                     data_parallel=False, checkpoint_every=4, **kw)
        return model, hist

    model_a, hist_a = run(10)
    run(8, checkpoint_dir=tmp_path / "ck")   # checkpoints at steps 4 and 8
    assert [c.name for c in list_checkpoints(tmp_path / "ck")] == ["checkpoint-000004",
                                                                   "checkpoint-000008"]
    model_b, hist_b = run(10, resume_from=tmp_path / "ck" / "checkpoint-000004")
    assert_same_run(model_a, hist_a, model_b, hist_b)
    state = json.loads((tmp_path / "ck" / "checkpoint-000008" / "trainer_state.json").read_text())
    assert set(state["rng"]) == {"backend", "data"} and state["step"] == 8
    assert state["optimizer"]["steps"]["0"] == 8


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    model, opt, sched, data = lora_run()
    full = train(model, data, opt, STEPS, scheduler=sched, progress=False, data_parallel=False)

    model2, opt2, sched2, data2 = lora_run()

    def eval_fn(m):       # Ctrl-C arrives during step 7's evaluation
        raise KeyboardInterrupt
    with pytest.raises(TrainingInterrupted) as info:
        train(model2, data2, opt2, STEPS, scheduler=sched2, progress=False, data_parallel=False,
              checkpoint_dir=tmp_path / "ck", eval_fn=eval_fn, eval_every=7)
    assert info.value.step == 7 and info.value.checkpoint.name == "checkpoint-000007"
    assert "resume_from=" in str(info.value)
    model3, opt3, sched3, data3 = lora_run()
    resumed = train(model3, data3, opt3, STEPS, scheduler=sched3, progress=False,
                    data_parallel=False, resume_from=info.value.checkpoint)
    assert_same_run(model, full, model3, resumed)


def test_resume_refuses_other_parameters_and_missing_checkpoints(tmp_path):
    model, opt, sched, data = lora_run()
    train(model, data, opt, 2, scheduler=sched, progress=False, checkpoint_dir=tmp_path / "ck")
    backend.manual_seed(0)
    other = get_peft_model(LlamaForCausalLM(LlamaConfig(**CFG)),
                           LoraConfig(r=4, target_modules=["k_proj"]))
    opt_other = AdamW([p for p in other.parameters() if p.requires_grad])
    with pytest.raises(ResumeError, match="same model"):
        train(other, data, opt_other, 4, progress=False, resume_from=tmp_path / "ck")
    with pytest.raises(ResumeError, match="no checkpoint to resume from"):
        train(model, data, opt, 4, progress=False, resume_from=tmp_path / "nothing")
    with pytest.raises(ResumeError, match="pass steps >= 2"):
        train(model, data, opt, 1, progress=False, resume_from=tmp_path / "ck")


CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import test_resume as t
from minilora.train import train
model, opt, sched, data = t.lora_run()
def slow():
    for batch in data:
        time.sleep(0.05)   # the parent has time to kill the run between checkpoints
        yield batch
train(model, slow(), opt, t.STEPS, scheduler=sched, progress=False, data_parallel=False,
      checkpoint_dir={ck!r}, checkpoint_every=2)
"""


def _start_child(ck: Path):
    code = CHILD.format(tests=str(Path(__file__).parent), ck=str(ck))
    return subprocess.Popen([sys.executable, "-c", code], preexec_fn=sigint_by_default,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(child, ck: Path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not list_checkpoints(ck):
        assert child.poll() is None, child.communicate()[1]
        assert time.monotonic() < deadline, "the child wrote no checkpoint"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_child_run_resumes_to_the_uninterrupted_result(tmp_path, sig):
    """SIGKILL mid-run leaves the last complete checkpoint; SIGINT (Ctrl-C) makes the run save one
    and end with TrainingInterrupted. Either way the resumed run equals the uninterrupted one."""
    ck = tmp_path / "ck"
    child = _start_child(ck)
    _wait_for_checkpoint(child, ck)
    os.kill(child.pid, sig)
    _, err = child.communicate(timeout=60)
    assert child.returncode != 0
    if sig == signal.SIGINT:
        assert "TrainingInterrupted" in err and "resume_from=" in err
    assert not [d for d in ck.iterdir() if d.name.startswith(".")] or sig == signal.SIGKILL
    model, opt, sched, data = lora_run()
    full = train(model, data, opt, STEPS, scheduler=sched, progress=False, data_parallel=False)
    model2, opt2, sched2, data2 = lora_run()
    resumed = train(model2, data2, opt2, STEPS, scheduler=sched2, progress=False,
                    data_parallel=False, resume_from=ck)
    assert_same_run(model, full, model2, resumed)
