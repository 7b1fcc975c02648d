from collections import deque

import pytest
import torch

import gradkit as gk
from tests.helpers import make_params
from tests.transforms._common import assert_transform_roundtrip, set_grads


def paper_ema(params, state, alpha, lamb):
    """Grokfast-EMA as the paper states it: μ starts at the first gradient; μ ← αμ + (1−α)g; g ← g + λμ."""
    for i, p in enumerate(params):
        if i not in state:
            state[i] = p.grad.clone()
        state[i] = state[i] * alpha + p.grad * (1 - alpha)
        p.grad = p.grad + state[i] * lamb


def paper_ma(params, state, window, lamb):
    """Grokfast-MA (warm-up on): no change until the window is full, then g ← g + λ·mean(window)."""
    for i, p in enumerate(params):
        q = state.setdefault(i, deque(maxlen=window))
        q.append(p.grad.clone())
        if len(q) == window:
            p.grad = p.grad + sum(q) / window * lamb


@pytest.mark.parametrize("kind,alpha,lamb,window", [("ema", 0.98, 2.0, 0), ("ema", 0.8, 0.5, 0),
                                                    ("ma", 0.0, 5.0, 17)])
def test_grokfast_matches_paper_rule(kind, alpha, lamb, window):
    ours, ref = make_params(), make_params()
    gf = gk.transforms.Grokfast(alpha=alpha, lamb=lamb, kind=kind, window=max(window, 1))
    state: dict = {}
    for step in range(200):
        set_grads(ours, step)
        set_grads(ref, step)
        gf(ours)
        if kind == "ema":
            paper_ema(ref, state, alpha, lamb)
        else:
            paper_ma(ref, state, window, lamb)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_first_ema_step_is_one_plus_lambda_times_gradient():
    params = make_params()
    set_grads(params, 0)
    raw = [p.grad.clone() for p in params]
    gk.transforms.Grokfast(alpha=0.9, lamb=2.0)(params)
    for p, g in zip(params, raw):
        torch.testing.assert_close(p.grad, 3.0 * g)


def test_frozen_parameter_is_skipped_and_keeps_its_buffer():
    params = make_params()
    gf = gk.transforms.Grokfast()
    set_grads(params, 0)
    gf(params)
    before = gf.state_dict()["ema"][1].clone()
    set_grads(params, 1)
    params[1].grad = None
    gf(params)
    assert params[1].grad is None
    assert torch.equal(gf.state_dict()["ema"][1], before)


def test_changing_parameter_list_is_an_error():
    params = make_params()
    gf = gk.transforms.Grokfast()
    set_grads(params, 0)
    gf(params)
    with pytest.raises(ValueError, match="same parameter list"):
        gf(params[:-1])


@pytest.mark.parametrize("name,kw", [("alpha", dict(alpha=1.0)), ("alpha", dict(alpha=-0.1)),
                                     ("lamb", dict(lamb=-1.0)), ("kind", dict(kind="fir")),
                                     ("window", dict(window=0))])
def test_bad_input(name, kw):
    with pytest.raises(ValueError, match=name):
        gk.transforms.Grokfast(**kw)


def test_roundtrip():
    assert_transform_roundtrip(lambda: gk.transforms.Grokfast(alpha=0.9))
    assert_transform_roundtrip(lambda: gk.transforms.Grokfast(kind="ma", window=10, lamb=1.0), steps=25)


def test_grokfast_then_adam_matches_grokfast_pytorch():
    """grokfast-pytorch's GrokFastAdamW = Grokfast-EMA on the gradient, then Adam (eps as a clamp, not a sum)."""
    ref_mod = pytest.importorskip("grokfast_pytorch")
    ours, ref = make_params(), make_params()
    opt = torch.optim.Adam(ours, lr=1e-3, betas=(0.9, 0.99), eps=1e-12)
    gf = gk.transforms.Grokfast(alpha=0.9, lamb=2.0)
    ref_opt = ref_mod.GrokFastAdamW(ref, lr=1e-3, betas=(0.9, 0.99), eps=1e-12, grokfast_alpha=0.9,
                                    grokfast_lamb=2.0, normalize_lr=False)
    for step in range(200):
        set_grads(ours, step)
        set_grads(ref, step)
        gf(ours)
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert max(float((a - b).detach().abs().max()) for a, b in zip(ours, make_params())) > 0.05  # they moved
