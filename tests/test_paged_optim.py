"""PagedAdamW (minilora/paged_optim.py): the same numbers as AdamW, with its moments in host memory.

On the CPU the default is plain AdamW (nothing to page); ``paged=True`` forces the staging path, so
the paging logic (host state, staging buffers sized to the largest parameter, copies in and out) is
checked here without a GPU. The CUDA tests compare against AdamW on the GPU and check that the
moments are host (pinned) arrays; they skip where there is no GPU.
"""
import numpy as np
import pytest

from minilora import backend
from minilora.nn import Parameter
from minilora.optim import AdamW
from minilora.paged_optim import PagedAdamW

SHAPES = [(16, 8), (8,), (3, 5, 4), (40, 2)]


def _params(device="cpu", seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(backend.to_device(rng.standard_normal(s).astype(np.float32), device))
            for s in SHAPES]


def _run(opt_cls, steps=7, device="cpu", **kw):
    """``steps`` updates of ``opt_cls`` on fixed pseudo-gradients; returns (params, optimizer)."""
    params = _params(device)
    params[1].requires_grad = False          # frozen: must get no state
    opt = opt_cls(params, lr=1e-2, weight_decay=0.1, **kw)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        for p in params:
            p.grad = backend.to_device(rng.standard_normal(p.shape).astype(np.float32), device) \
                if p.requires_grad else None
        opt.step()
        opt.zero_grad()
    return params, opt


@pytest.mark.parametrize("paged", [None, True])
def test_equals_adamw_bit_for_bit_on_cpu(paged):
    ref, ref_opt = _run(AdamW)
    got, opt = _run(PagedAdamW, paged=paged)
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a.numpy(), b.numpy())   # same arithmetic, same order
    sd_ref, sd = ref_opt.state_dict(), opt.state_dict()
    assert sd["state"].keys() == sd_ref["state"].keys() and 1 not in sd["state"]   # frozen: no state
    for i in sd["state"]:
        for k in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(sd["state"][i][k], sd_ref["state"][i][k])
        assert sd["state"][i]["step"] == 7


def test_cpu_default_is_plain_adamw_and_forced_paging_keeps_state_on_the_host():
    _, plain = _run(PagedAdamW)
    assert plain.host_state_bytes() == 0                      # nothing paged on the CPU
    assert plain.device_state_bytes() == 8 * (16 * 8 + 3 * 5 * 4 + 40 * 2)
    _, paged = _run(PagedAdamW, paged=True)
    n_trainable = 16 * 8 + 3 * 5 * 4 + 40 * 2
    assert paged.host_state_bytes() == 8 * n_trainable        # m and v, float32, per trainable value
    assert paged.device_state_bytes() == 8 * 16 * 8           # two staging arrays of the largest
    _, never = _run(PagedAdamW, paged=False)
    assert never.host_state_bytes() == 0


def test_state_dict_moves_between_adamw_and_paged():
    ref, ref_opt = _run(AdamW, steps=3)
    params = _params()
    params[1].requires_grad = False
    for p, r in zip(params, ref):
        p.data = r.data.copy()
    opt = PagedAdamW(params, lr=1e-2, weight_decay=0.1, paged=True)
    opt.load_state_dict(ref_opt.state_dict())
    assert opt.host_state_bytes() == 8 * (16 * 8 + 3 * 5 * 4 + 40 * 2)   # loaded into host arrays
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    for o, ps in ((ref_opt, ref), (opt, params)):
        for p, g in zip(ps, grads):
            p.grad = g.copy() if p.requires_grad else None
        o.step()
    for a, b in zip(ref, params):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert opt.host_state_bytes() == 8 * (16 * 8 + 3 * 5 * 4 + 40 * 2)


def test_bad_paged_argument():
    with pytest.raises(ValueError, match="paged must be"):
        PagedAdamW(_params(), paged="yes")


@pytest.mark.cuda
def test_cuda_equals_adamw_with_moments_in_host_memory(cuda_device):
    ref, _ = _run(AdamW, device="cuda")
    got, opt = _run(PagedAdamW, device="cuda")
    for a, b in zip(ref, got):
        # the same kernels in the same order: equal up to nothing, allow float32 rounding anyway
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    for pid, st in opt.state.items():
        assert isinstance(st["exp_avg"], np.ndarray) and isinstance(st["exp_avg_sq"], np.ndarray)
    assert opt.device_state_bytes() == 8 * 16 * 8
