"""Optimizers, clipping and schedules against PyTorch / transformers, and the LoRA-relevant rule that
frozen parameters get no optimizer state."""
import math
import unittest.mock

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from minilora import Tensor, nn
from minilora.optim import (SGD, AdamW, LambdaLR, WarmupCosine, clip_grad_norm_,
                            get_cosine_schedule_with_warmup)

EPS32 = float(np.finfo(np.float32).eps)


def make_params(seed=0, shapes=((3, 4), (4,), (2, 3, 2))):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def grads_for(step, shapes, seed=1):
    rng = np.random.default_rng([seed, step])
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def run_minilora(opt_fn, arrays, steps):
    params = [nn.Parameter(a.copy()) for a in arrays]
    opt = opt_fn(params)
    for t in range(steps):
        for p, g in zip(params, grads_for(t, [a.shape for a in arrays])):
            p.grad = g
        opt.step()
        opt.zero_grad()
    return [p.data for p in params], opt


def run_torch(torch, opt_fn, arrays, steps):
    params = [torch.nn.Parameter(torch.tensor(a.copy())) for a in arrays]
    opt = opt_fn(params)
    for t in range(steps):
        for p, g in zip(params, grads_for(t, [a.shape for a in arrays])):
            p.grad = torch.tensor(g)
        opt.step()
        opt.zero_grad()
    return [p.detach().numpy() for p in params]


@pytest.mark.interop
@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6,
                                                    weight_decay=0.1), dict(lr=1e-3, weight_decay=0.0)])
def test_adamw_matches_torch(kw):
    torch = pytest.importorskip("torch")
    arrays = make_params()
    ours, _ = run_minilora(lambda ps: AdamW(ps, **kw), arrays, steps=7)
    ref = run_torch(torch, lambda ps: torch.optim.AdamW(ps, **kw), arrays, steps=7)
    for a, b in zip(ours, ref):  # float32 arithmetic in a different order: a few ulps
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_adamw_in_cache_sized_pieces_is_bit_identical(monkeypatch):
    """A big parameter is updated in pieces (settings.ADAMW_CACHE_PIECE numbers, the last one
    partial): elementwise arithmetic, so the same bits as the whole-array update; and it matches torch."""
    from minilora import settings
    from minilora.fast import optim as fast_optim
    monkeypatch.setattr(settings, "ADAMW_CACHE_PIECE", 1000)
    arrays = [np.random.default_rng(5).standard_normal((37, 181)).astype(np.float32)]  # 6.7 pieces
    kw = dict(lr=3e-3, weight_decay=0.1)
    pieces, opt = run_minilora(lambda ps: AdamW(ps, **kw), arrays, steps=5)
    assert fast_optim.cache_pieces(*(pieces[0],) * 4)[-1] == slice(6000, 6697)
    monkeypatch.setattr(settings, "ADAMW_CACHE_PIECE", 10 ** 9)
    assert fast_optim.cache_pieces(*(pieces[0],) * 4) is None
    whole, _ = run_minilora(lambda ps: AdamW(ps, **kw), arrays, steps=5)
    np.testing.assert_array_equal(pieces[0], whole[0])
    torch = pytest.importorskip("torch")
    ref = run_torch(torch, lambda ps: torch.optim.AdamW(ps, **kw), arrays, steps=5)
    np.testing.assert_allclose(pieces[0], ref[0], rtol=1e-5, atol=1e-6)


def _reference_and_fast(shapes, steps, kw, seed):
    """Run AdamW in reference mode and on the fast path from the same start; return both, and the
    largest |p| and |update| the reference saw (per element), for the rounding bound."""
    from minilora import settings
    arrays = make_params(seed, shapes)
    runs = []
    for reference in (True, False):
        params = [nn.Parameter(a.copy()) for a in arrays]
        opt = AdamW(params, **kw)
        big_p = [np.abs(a).astype(np.float64) for a in arrays]
        big_u = [np.zeros(a.shape) for a in arrays]
        for t in range(steps):
            before = [p.data.copy() for p in params]
            for p, g in zip(params, grads_for(t, shapes, seed)):
                p.grad = g
            with settings.reference(reference):
                opt.step()
            for i, p in enumerate(params):
                big_p[i] = np.maximum(big_p[i], np.abs(p.data))
                big_u[i] = np.maximum(big_u[i], np.abs(p.data.astype(np.float64) - before[i]))
        runs.append((params, opt, big_p, big_u))
    return runs


@given(shapes=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
                       min_size=1, max_size=3),
       wd=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16))
@example(shapes=[(40, 40, 3), (7,)], wd=0.1, seed=1)    # 4800 numbers: five pieces, one partial
def test_adamw_fast_twin_equals_the_reference(shapes, wd, seed):
    """fast.optim.adamw_update_ (torch's arrangement, in pieces) against AdamW's reference lines
    over 6 steps, with pieces of 1000 numbers so that shapes up to 40³ span many pieces. m and v
    are computed by the same float32 operations in the same order: equal bits. p differs by the
    rounding of a few operations per step, each at most eps·(|p| + |update|) (the decay term is
    below |p|, and an error in p only shrinks through the decay), summed over the steps."""
    from minilora import settings
    steps, kw = 6, dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    with unittest.mock.patch.object(settings, "ADAMW_CACHE_PIECE", 1000):
        (ref, ref_opt, big_p, big_u), (fast, fast_opt, _, _) = _reference_and_fast(shapes, steps,
                                                                                  kw, seed)
    for i, (a, b) in enumerate(zip(ref, fast)):
        for key in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(ref_opt.state[id(a)][key], fast_opt.state[id(b)][key])
        bound = steps * 8 * EPS32 * (big_p[i] + big_u[i])
        assert np.all(np.abs(a.data.astype(np.float64) - b.data) <= bound)


def test_sgd_is_the_same_in_reference_mode():
    from minilora import settings
    arrays = make_params()
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    fast, _ = run_minilora(lambda ps: SGD(ps, **kw), arrays, steps=4)
    with settings.reference():
        ref, _ = run_minilora(lambda ps: SGD(ps, **kw), arrays, steps=4)
    for a, b in zip(fast, ref):
        np.testing.assert_array_equal(a, b)    # one update rule; only the threading differs


def test_adamw_defaults_are_torch_defaults():
    opt = AdamW([nn.Parameter(np.zeros(2, dtype=np.float32))])
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 1e-2)


@pytest.mark.interop
@pytest.mark.parametrize("kw", [dict(lr=0.1), dict(lr=0.05, momentum=0.9),
                                dict(lr=0.05, momentum=0.9, weight_decay=0.01, dampening=0.1),
                                dict(lr=0.05, momentum=0.9, nesterov=True)])
def test_sgd_matches_torch(kw):
    torch = pytest.importorskip("torch")
    arrays = make_params()
    ours, _ = run_minilora(lambda ps: SGD(ps, **kw), arrays, steps=5)
    ref = run_torch(torch, lambda ps: torch.optim.SGD(ps, **kw), arrays, steps=5)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_params_get_no_state_and_do_not_move():
    trained = nn.Parameter(np.ones(3, dtype=np.float32))
    frozen = nn.Parameter(np.ones(3, dtype=np.float32), requires_grad=False)
    no_grad_yet = nn.Parameter(np.ones(3, dtype=np.float32))
    opt = AdamW([trained, frozen, no_grad_yet], lr=0.1)
    trained.grad = np.ones(3, dtype=np.float32)
    frozen.grad = np.ones(3, dtype=np.float32)   # even a stray gradient is ignored
    opt.step()
    assert id(trained) in opt.state and id(frozen) not in opt.state
    assert id(no_grad_yet) not in opt.state
    assert set(opt.state[id(trained)]) == {"step", "exp_avg", "exp_avg_sq"}
    np.testing.assert_array_equal(frozen.data, np.ones(3))
    assert not np.allclose(trained.data, 1.0)


def test_zero_grad_and_param_groups():
    a, b = nn.Parameter(np.ones(2, dtype=np.float32)), nn.Parameter(np.ones(2, dtype=np.float32))
    opt = AdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0, "lr": 0.5}], lr=0.1)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["lr"] == 0.5
    a.grad = b.grad = np.zeros(2, dtype=np.float32)
    opt.step()
    np.testing.assert_allclose(a.data, 1 - 0.1 * 0.01)   # decoupled decay only
    np.testing.assert_array_equal(b.data, 1.0)            # no decay, zero gradient: no move
    opt.zero_grad()
    assert a.grad is None and b.grad is None
    with pytest.raises(ValueError, match="unknown optimizer option"):
        AdamW([{"params": [a], "momentum": 0.9}])
    with pytest.raises(ValueError, match="empty"):
        AdamW([])


def test_state_dict_round_trip_continues_identically():
    arrays = make_params()
    shapes = [a.shape for a in arrays]
    params, opt = run_minilora(lambda ps: AdamW(ps, lr=1e-2), arrays, steps=3)
    sd = opt.state_dict()
    assert all(isinstance(v, np.ndarray) for st in sd["state"].values()
               for k, v in st.items() if k != "step")
    p2 = [nn.Parameter(p.copy()) for p in params]
    opt2 = AdamW(p2, lr=1e-2)
    opt2.load_state_dict(sd)
    p1 = [nn.Parameter(p.copy()) for p in params]
    opt1 = AdamW(p1, lr=1e-2)
    opt1.load_state_dict(opt.state_dict())
    for ps, o in ((p1, opt1), (p2, opt2)):
        for p, g in zip(ps, grads_for(9, shapes)):
            p.grad = g
        o.step()
    for x, y in zip(p1, p2):
        np.testing.assert_array_equal(x.data, y.data)
    bad = opt.state_dict()
    bad["state"][0]["exp_avg"] = np.zeros((9, 9), dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        AdamW([nn.Parameter(p.copy()) for p in params]).load_state_dict(bad)


@pytest.mark.interop
@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    torch = pytest.importorskip("torch")
    grads = grads_for(0, [(3, 4), (5,)])
    ps = [nn.Parameter(np.zeros_like(g)) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = g.copy()
    frozen = nn.Parameter(np.zeros(2, dtype=np.float32))   # grad None: skipped
    total = clip_grad_norm_(ps + [frozen], max_norm)
    tps = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for p, g in zip(tps, grads):
        p.grad = torch.tensor(g)
    ttotal = torch.nn.utils.clip_grad_norm_(tps, max_norm)
    assert math.isclose(total, float(ttotal), rel_tol=1e-6)
    for p, t in zip(ps, tps):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-6, atol=1e-7)
    assert clip_grad_norm_([frozen], 1.0) == 0.0


@pytest.mark.interop
@pytest.mark.parametrize("bad", [[np.inf, 1.0], [np.nan, 1.0], [np.inf, np.nan], [-np.inf, 2.0]])
def test_clip_grad_norm_reports_nonfinite_gradients_as_torch(bad):
    """torch returns the inf/NaN norm, or raises with error_if_nonfinite=True; so does minilora
    (leaving the gradients unscaled where torch turns them into 0 and NaN)."""
    torch = pytest.importorskip("torch")
    ps = [nn.Parameter(np.zeros(2, dtype=np.float32)) for _ in range(2)]
    tps = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    for p, t, g in zip(ps, tps, (bad, [1.0, 2.0])):
        p.grad = np.array(g, dtype=np.float32)
        t.grad = torch.tensor(g, dtype=torch.float32)
    total = clip_grad_norm_(ps, 1.0)
    ttotal = float(torch.nn.utils.clip_grad_norm_(tps, 1.0))
    assert (math.isnan(total) and math.isnan(ttotal)) or total == ttotal
    np.testing.assert_array_equal(ps[0].grad, np.array(bad, dtype=np.float32))
    for p, t in zip(ps, tps):
        t.grad = torch.tensor(p.grad)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(tps, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="error_if_nonfinite=False"):
        clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)


@pytest.mark.interop
def test_clip_grad_norm_of_huge_finite_gradients_matches_torch_in_float64():
    """Gradients of 3e38: torch's float32 norm overflows to inf (and clipping zeroes them); minilora's
    does not overflow and equals torch's float64 norm, and its clipped gradients torch's float64
    clipped ones, to float32 rounding."""
    torch = pytest.importorskip("torch")
    grads = [np.array([3e38, -3e38, 1e38], dtype=np.float32), np.array([2e38, 5.0], dtype=np.float32)]
    ps = [nn.Parameter(np.zeros_like(g)) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = g.copy()
    t32 = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    t64 = [torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.float64)) for g in grads]
    for a, b, g in zip(t32, t64, grads):
        a.grad = torch.tensor(g)
        b.grad = torch.tensor(g.astype(np.float64))
    assert math.isinf(float(torch.nn.utils.clip_grad_norm_(t32, 1.0)))   # what minilora avoids
    want = float(torch.nn.utils.clip_grad_norm_(t64, 1.0))
    assert clip_grad_norm_(ps, 1.0) == pytest.approx(want, rel=1e-6)
    for p, t in zip(ps, t64):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-6, atol=1e-30)


@pytest.mark.interop
def test_cosine_schedule_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    p = nn.Parameter(np.zeros(1, dtype=np.float32))
    opt = AdamW([p], lr=0.1)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=30)
    tp = torch.nn.Parameter(torch.zeros(1))
    topt = torch.optim.AdamW([tp], lr=0.1)
    tsched = transformers.get_cosine_schedule_with_warmup(topt, 5, 30)
    for _ in range(35):
        assert math.isclose(sched.get_last_lr()[0], tsched.get_last_lr()[0], rel_tol=1e-12,
                            abs_tol=1e-15)
        p.grad = np.zeros(1, dtype=np.float32)
        opt.step()
        topt.step()
        sched.step()
        tsched.step()


def test_warmup_cosine_values():
    f = WarmupCosine(10, 110)
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == 1.0
    assert math.isclose(f(60), 0.5) and math.isclose(f(110), 0.0, abs_tol=1e-12)
    g = WarmupCosine(0, 100, min_ratio=0.1)
    assert g(0) == 1.0 and math.isclose(g(100), 0.1)
    opt = SGD([nn.Parameter(np.zeros(1, dtype=np.float32))], lr=2.0)
    sched = LambdaLR(opt, f)
    assert opt.param_groups[0]["lr"] == 0.0
    for _ in range(10):
        sched.step()
    assert opt.param_groups[0]["lr"] == 2.0
    with pytest.raises(ValueError):
        WarmupCosine(-1, 10)


def test_update_is_vectorised_float32():
    p = nn.Parameter(np.ones((64, 64), dtype=np.float32))
    opt = AdamW([p], lr=0.1)
    p.grad = np.ones((64, 64), dtype=np.float32)
    opt.step()
    assert p.data.dtype == np.float32 and opt.state[id(p)]["exp_avg"].dtype == np.float32


def test_bad_hyperparameters():
    p = [nn.Parameter(np.zeros(1, dtype=np.float32))]
    with pytest.raises(ValueError):
        AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError):
        SGD(p, lr=-1)
    with pytest.raises(ValueError):
        AdamW([Tensor(np.zeros(1)), "x"])
