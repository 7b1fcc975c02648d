"""OptimisticAMSGrad: the paper's update on hand-computed sequences, the extrapolated guess, state, copies.

No reference implementation exists on PyPI (searched by name and summary), so there is no parity test."""

import copy
import math
import pickle

import pytest
import torch

import gradkit as gk
from gradkit.optim.optimistic_amsgrad import rmpe
from tests.helpers import assert_state_dict_roundtrip, make_params, run_sequence


def test_rule_on_a_hand_computed_sequence_last_gradient_guess():
    b1, b2, lr, eps = 0.5, 0.75, 0.1, 1e-8
    w = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = gk.optim.OptimisticAMSGrad([w], lr=lr, betas=(b1, b2), eps=eps, predictor="last")
    grads = [2.0, -1.0, 0.5, 3.0]
    # by hand: θ, v, v̂, the half point and the optimistic point
    theta = v = vhat = 0.0
    half = 1.0
    for g in grads:
        w.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        prev = theta
        theta = b1 * theta + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vhat = max(vhat, v)
        denom = math.sqrt(vhat) + eps
        half = half - lr * theta / denom
        h = b1 * prev + (1 - b1) * g  # guess m_{t+1} = g_t
        want = half - lr * h / denom
        assert w.item() == pytest.approx(want, rel=1e-14, abs=1e-15)
    # first step, written out: θ1 = 1, v1 = 1, half = 1 - 0.1, h = 0.5·0 + 0.5·2 = 1 → w = 0.8
    w2 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    o2 = gk.optim.OptimisticAMSGrad([w2], lr=lr, betas=(b1, b2), eps=0.0 + 1e-300, predictor="last")
    w2.grad = torch.tensor([2.0], dtype=torch.float64)
    o2.step()
    assert w2.item() == pytest.approx(0.8, rel=1e-12)


def test_half_sequence_is_amsgrad_and_vhat_never_decreases():
    ps = make_params(((6, 3),), seed=1, dtype=torch.float64)
    opt = gk.optim.OptimisticAMSGrad(ps, lr=0.01, predictor="extrapolation")
    half = ps[0].detach().clone()
    theta = torch.zeros_like(half)
    v = torch.zeros_like(half)
    vhat = torch.zeros_like(half)
    gen = torch.Generator().manual_seed(2)
    for _ in range(12):
        g = torch.randn(half.shape, generator=gen, dtype=torch.float64)
        ps[0].grad = g
        before = opt.state[ps[0]]["max_exp_avg_sq"].clone() if opt.state[ps[0]] else torch.zeros_like(g)
        opt.step()
        theta = 0.9 * theta + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        vhat = torch.maximum(vhat, v)
        half = half - 0.01 * theta / (vhat.sqrt() + 1e-8)
        st = opt.state[ps[0]]
        torch.testing.assert_close(st["half"], half, rtol=1e-12, atol=1e-14)
        assert bool((st["max_exp_avg_sq"] >= before).all())


def test_rmpe_recovers_the_limit_of_a_geometric_sequence():
    gen = torch.Generator().manual_seed(3)
    limit, e = torch.randn(10, generator=gen, dtype=torch.float64), torch.randn(10, generator=gen, dtype=torch.float64)
    xs = torch.stack([limit + 0.6**k * e for k in range(5)])
    torch.testing.assert_close(rmpe(xs, reg=1e-12), limit, rtol=1e-6, atol=1e-6)
    assert float((xs[-1] - limit).norm()) > 0.1  # the last point alone is far off


def test_extrapolated_guess_enters_the_update():
    """With the guess from RMPE over the last gradients (all tensors as one vector), w = half - lr·h/denom."""
    b1, lr = 0.9, 0.05
    ps = make_params(((4,), (2, 3)), seed=4, dtype=torch.float64)
    opt = gk.optim.OptimisticAMSGrad(ps, lr=lr, history=4, reg=1e-3)
    gen = torch.Generator().manual_seed(5)
    seen = []
    prev = [torch.zeros_like(p) for p in ps]
    for _ in range(7):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
        seen.append(torch.cat([g.reshape(-1) for g in grads]))
        hist = torch.stack(seen[-4:])
        guess = rmpe(hist, reg=1e-3) if len(hist) >= 3 else seen[-1]
        off = 0
        for i, p in enumerate(ps):
            st = opt.state[p]
            n = p.numel()
            h = b1 * prev[i] + (1 - b1) * guess[off:off + n].view_as(p)
            denom = st["max_exp_avg_sq"].sqrt() + 1e-8
            torch.testing.assert_close(p.detach(), st["half"] - lr * h / denom, rtol=1e-10, atol=1e-12)
            prev[i] = st["exp_avg"].clone()
            off += n


def test_optimism_helps_on_a_predictable_gradient_sequence():
    """A slowly rotating quadratic: consecutive gradients are predictable, the optimistic guess shortens the
    path to the optimum compared with the same update without a guess."""
    def run(predictor):
        w = torch.tensor([3.0, -2.0], dtype=torch.float64, requires_grad=True)
        opt = gk.optim.OptimisticAMSGrad([w], lr=0.05, betas=(0.5, 0.99), predictor=predictor)
        for _ in range(150):
            w.grad = torch.tensor([1.0, 10.0], dtype=torch.float64) * w.detach()
            opt.step()
        return float(w.detach().norm())

    assert run("last") < run("zero")


def test_state_dict_round_trip_bit_exact():
    assert_state_dict_roundtrip(lambda p: gk.optim.OptimisticAMSGrad(p, lr=1e-2))
    assert_state_dict_roundtrip(lambda p: gk.optim.OptimisticAMSGrad(p, lr=1e-2, predictor="last"))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_step_identically(how):
    params, opt = run_sequence(lambda p: gk.optim.OptimisticAMSGrad(p, lr=1e-2), steps=6)
    twin = copy.deepcopy((params, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((params, opt)))
    run_sequence(lambda p: None, steps=4, start=6, params=params, opt=opt)
    run_sequence(lambda p: None, steps=4, start=6, params=twin[0], opt=twin[1])
    for a, b in zip(params, twin[0]):
        assert torch.equal(a, b)


def test_bad_input_names_the_argument():
    ps = make_params()
    for kw, name in [({"predictor": "oracle"}, "predictor"), ({"history": 1}, "history"), ({"reg": 0.0}, "reg"),
                     ({"lr": -1.0}, "lr"), ({"betas": (1.0, 0.9)}, "betas"), ({"eps": 0.0}, "eps"),
                     ({"weight_decay": -0.1}, "weight_decay")]:
        with pytest.raises(ValueError, match=name):
            gk.optim.OptimisticAMSGrad(ps, **kw)
