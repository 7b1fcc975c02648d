import math

import pytest
import torch

import gradkit as gk
from tests.helpers import make_params
from tests.transforms._common import assert_transform_roundtrip, set_grads


def test_norms_and_cosine_are_exact_and_grads_unchanged():
    params = make_params()
    gs = gk.transforms.GradStats()
    set_grads(params, 0)
    prev = [p.grad.clone() for p in params]
    first = gs(params)
    assert math.isnan(float(first["cosine"]))
    set_grads(params, 1)
    cur = [p.grad.clone() for p in params]
    out = gs(params)
    for p, g in zip(params, cur):
        assert torch.equal(p.grad, g)
    flat, flat_prev = torch.cat([g.flatten() for g in cur]), torch.cat([g.flatten() for g in prev])
    torch.testing.assert_close(out["grad_norm"], flat.norm(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out["norms"], torch.stack([g.norm() for g in cur]), rtol=1e-6, atol=0)
    cos = torch.nn.functional.cosine_similarity(flat, flat_prev, dim=0)
    torch.testing.assert_close(out["cosine"], cos, rtol=1e-4, atol=1e-5)


def test_noise_scale_recovers_known_ratio():
    """g_t = G + ε_t, ε ~ N(0, s²I): tr(Σ_B)/‖G‖² is known; B_simple = B·tr(Σ_B)/‖G‖²."""
    d, batch, steps = 500, 32, 1500
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(d, generator=gen)
    G /= G.norm()  # ‖G‖² = 1
    s2 = 1.5 / d  # tr(Σ_B) = 1.5
    p = torch.zeros(d, requires_grad=True)
    gs = gk.transforms.GradStats(batch_size=batch, beta=0.995)
    for _ in range(steps):
        p.grad = G + torch.randn(d, generator=gen) * s2 ** 0.5
        out = gs([p])
    est = float(out["noise_scale"])
    # ~1/(1-β)=200 effective samples of estimates with ~6 % relative spread each: 8 % is several σ, while a
    # factor-2 error (e.g. without the ½) would fail.
    assert abs(est / (batch * 1.5) - 1) < 0.08, est


def test_noise_scale_is_nan_without_signal():
    gen = torch.Generator().manual_seed(1)
    p = torch.zeros(200, requires_grad=True)
    gs = gk.transforms.GradStats(beta=0.5)
    for _ in range(5):
        p.grad = -torch.ones(200) if _ % 2 else torch.ones(200)  # anti-correlated: g_t·g_{t-1} < 0
        out = gs([p])
    assert math.isnan(float(out["noise_scale"]))
    assert float(out["cosine"]) == pytest.approx(-1.0)
    del gen


@pytest.mark.parametrize("name,kw", [("batch_size", dict(batch_size=0)), ("beta", dict(beta=1.0))])
def test_bad_input(name, kw):
    with pytest.raises(ValueError, match=name):
        gk.transforms.GradStats(**kw)


def test_roundtrip():
    # Gradients are unchanged, so compare the statistics of the resumed and straight runs instead.
    def stats_run(gs, start, steps):
        params = make_params()
        out = []
        for s in range(start, start + steps):
            set_grads(params, s)
            out.append(gs(params))
        return out

    straight = stats_run(gk.transforms.GradStats(), 0, 20)
    first = gk.transforms.GradStats()
    stats_run(first, 0, 10)
    fresh = gk.transforms.GradStats()
    fresh.load_state_dict(first.state_dict())
    resumed = stats_run(fresh, 10, 10)
    for a, b in zip(straight[10:], resumed):
        assert torch.equal(a["noise_scale"], b["noise_scale"]) and torch.equal(a["cosine"], b["cosine"])
    assert_transform_roundtrip(lambda: gk.transforms.GradStats(), steps=5)
