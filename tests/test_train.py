"""The training loop: it learns (loss falls on a tiny overfit task), it records a usable history,
it is deterministic under a seed, and it saves checkpoints."""
import numpy as np
import pytest

from minilora import backend
from minilora.models import LlamaConfig, LlamaForCausalLM
from minilora.optim import AdamW, get_cosine_schedule_with_warmup
from minilora.train import evaluate, train

CFG = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
           num_attention_heads=2, max_position_embeddings=16, pad_token_id=None)


def tiny_model(seed=0):
    backend.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CFG))


def random_batch(step=None):
    ids = backend.rng().integers(0, 32, (4, 8))
    return ids, ids.copy()


FIXED = np.random.default_rng(0).integers(0, 32, (2, 8))


def test_loss_goes_down_on_overfit_task():
    model = tiny_model()
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    hist = train(model, lambda step: {"input_ids": FIXED, "labels": FIXED}, opt, steps=60,
                 progress=False)
    assert len(hist) == 60
    assert hist[-1]["loss"] < 0.3 * hist[0]["loss"]
    assert hist[0]["loss"] == pytest.approx(np.log(32), rel=0.1)   # uniform at init


def test_history_has_eval_losses_lr_and_throughput():
    model = tiny_model()
    opt = AdamW(model.parameters(), lr=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, 2, 10)
    val = [(FIXED, FIXED)]
    hist = train(model, random_batch, opt, steps=10, eval_fn=lambda m: evaluate(m, val),
                 eval_every=4, scheduler=sched, progress=True, seed=3)
    evals = [h["step"] for h in hist if "eval_loss" in h]
    assert evals == [4, 8, 10]
    assert hist[0]["lr"] == 0.0 and hist[2]["lr"] == pytest.approx(1e-2)
    assert all(h["tokens_per_s"] > 0 and h["grad_norm"] > 0 for h in hist)
    assert set(hist[3]) == {"step", "loss", "lr", "tokens_per_s", "grad_norm", "eval_loss"}
    assert model.training          # eval switched back to training mode


def test_same_seed_same_losses():
    def run(seed):
        model = tiny_model()
        opt = AdamW(model.parameters(), lr=1e-2)
        return [h["loss"] for h in train(model, random_batch, opt, steps=5, progress=False,
                                         seed=seed)]
    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c


def test_accepts_iterators_and_reports_exhaustion():
    model = tiny_model()
    opt = AdamW(model.parameters(), lr=1e-3)
    batches = iter([(FIXED, FIXED)] * 2)
    with pytest.raises(ValueError, match="ran out at step 2"):
        train(model, batches, opt, steps=3, progress=False)
    hist = train(model, [(FIXED, FIXED)] * 2, opt, steps=2, progress=False, clip=None)
    assert len(hist) == 2 and hist[0]["grad_norm"] is None


def test_only_optimizer_params_are_trained_and_clipped():
    model = tiny_model()
    model.requires_grad_(False)
    head = model.lm_head.weight
    head.requires_grad_(True)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    opt = AdamW([head], lr=1e-2)
    train(model, lambda s: (FIXED, FIXED), opt, steps=3, progress=False, clip=1e-3)
    for n, p in model.named_parameters():
        changed = not np.array_equal(p.data, before[n])
        assert changed == (n == "lm_head.weight"), n


def test_checkpoint_saved(tmp_path):
    model = tiny_model()
    opt = AdamW(model.parameters(), lr=1e-2)
    train(model, random_batch, opt, steps=4, progress=False, checkpoint_dir=tmp_path / "ck",
          checkpoint_every=2)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "ck")
    np.testing.assert_array_equal(loaded(FIXED).data, model(FIXED).data)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nan_loss_stops_with_clear_error():
    model = tiny_model()
    opt = AdamW(model.parameters(), lr=1e-3)
    labels = np.full_like(FIXED, -100)   # nothing to predict: mean over zero targets is NaN
    with pytest.raises(FloatingPointError, match="step 1"):
        train(model, lambda s: (FIXED, labels), opt, steps=2, progress=False)


def test_bad_batches():
    model = tiny_model()
    opt = AdamW(model.parameters())
    with pytest.raises(ValueError, match="input_ids"):
        train(model, lambda s: {"ids": FIXED}, opt, steps=1, progress=False)
    with pytest.raises(ValueError):
        train(model, random_batch, opt, steps=-1, progress=False)


# ---------------------------------------------------------------- the `minilora pretrain` command
def test_pretrain_command_mixes_copy_drills_and_records_the_fraction(tmp_path, capsys):
    from minilora.cli import main as cli_main
    out = tmp_path / "base"
    tiny = ["--hidden-size", "16", "--layers", "1", "--heads", "2", "--intermediate-size", "32",
            "--block-size", "32", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1",
            "--max-chars", "20000", "--no-progress", "--out", str(out)]
    assert cli_main(["pretrain", "--steps", "2", "--copy-fraction", "0.2", *tiny]) == 0
    assert "20% of them copy drills" in capsys.readouterr().out
    readme = (out / "README.md").read_text()
    assert "copy drills (20% of the training bytes)" in readme and "20% drills" in readme
    assert "validation bytes (docstrings only" in readme and "| copy test |" in readme
    assert (out / "model.safetensors").is_file()
    assert cli_main(["pretrain", "--steps", "2", "--copy-fraction", "1", *tiny]) == 2
    err = capsys.readouterr().err.strip()
    assert "--copy-fraction must be in [0, 1)" in err and "\n" not in err


@pytest.mark.fast_path
def test_two_threads_train_the_same_model_as_one(monkeypatch):
    """The loop wraps the model in DataParallel and splits each batch over the CPU threads when each
    micro-batch gets at
    least MIN_TOKENS_PER_MICRO_BATCH tokens; with one thread it runs the plain step. Same seed, same
    batches: the losses agree to float32 rounding over five AdamW steps (the gradients differ only
    in summation order; measured: 0 or 1 ulp of the loss, ~7e-8)."""
    from minilora.settings import MIN_TOKENS_PER_MICRO_BATCH
    T = 128
    B = 2 * MIN_TOKENS_PER_MICRO_BATCH // T

    def batch(step):
        ids = backend.rng().integers(0, 32, (B, T))
        return ids, ids.copy()

    def run(threads):
        monkeypatch.setenv("MINILORA_NUM_THREADS", str(threads))
        backend.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**CFG, "max_position_embeddings": T}))
        opt = AdamW(model.parameters(), lr=1e-2)
        return [h["loss"] for h in train(model, batch, opt, steps=5, progress=False, seed=3)]
    one, two = run(1), run(2)
    assert one != two                                   # the split really ran (other rounding)
    np.testing.assert_allclose(two, one, rtol=1e-6)     # 16 float32 ulps


def _losses_and_weights(data_parallel):
    backend.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG))
    opt = AdamW(model.parameters(), lr=1e-2)
    hist = train(model, random_batch, opt, steps=3, progress=False, seed=5,
                 data_parallel=data_parallel)
    return [h["loss"] for h in hist], {n: p.data.copy() for n, p in model.named_parameters()}


@pytest.mark.fast_path
def test_data_parallel_true_splits_even_small_batches_and_trains_the_same_model(monkeypatch):
    """data_parallel=True splits every batch (here 4 x 8 tokens, far below the default minimum)
    over the threads; False never does. Three AdamW steps agree to float32 rounding: the split only
    sums the same products in another order (a few ulps of the gradient), which AdamW's division
    by sqrt(v) carries into the update at the same relative size; 1e-5 is ~100 float32 ulps."""
    from minilora import data_parallel as DP
    monkeypatch.setenv("MINILORA_NUM_THREADS", "2")
    made = []
    monkeypatch.setattr(DP, "replicate", lambda m, _r=DP.replicate: made.append(1) or _r(m))
    plain, w_plain = _losses_and_weights(False)
    assert made == []
    split, w_split = _losses_and_weights(True)
    assert len(made) == 3 * 2                          # two replicas a step
    assert plain != split                              # it really ran split (other rounding)
    np.testing.assert_allclose(split, plain, rtol=1e-6)
    for name in w_plain:
        np.testing.assert_allclose(w_split[name], w_plain[name], rtol=0, atol=1e-5, err_msg=name)


def test_default_data_parallel_is_off_in_reference_mode_and_with_one_thread(monkeypatch):
    """None means "when it helps": never in reference mode, never with one thread (the wrapper
    would be the plain call anyway, so the loop does not build it)."""
    import minilora
    from minilora import train as train_module
    built = []
    real = train_module.DataParallel
    monkeypatch.setattr(train_module, "DataParallel", lambda *a, **k: built.append(1) or real(*a, **k))
    monkeypatch.setenv("MINILORA_NUM_THREADS", "2")
    with minilora.reference():
        _losses_and_weights(None)
    assert built == []
    with minilora.reference(False):                   # the fast path, whatever the environment
        monkeypatch.setenv("MINILORA_NUM_THREADS", "1")
        _losses_and_weights(None)
        assert built == []
        monkeypatch.setenv("MINILORA_NUM_THREADS", "2")
        _losses_and_weights(None)
        assert built == [1]
    with pytest.raises(ValueError, match="data_parallel must be None, True or False"):
        train(tiny_model(), random_batch, AdamW(tiny_model().parameters()), steps=1, progress=False,
              data_parallel="yes")
