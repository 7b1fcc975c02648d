"""Defining properties of the estimated-gradient sources, as statistical tests with sample-size tolerances."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradkit as gk
from tests.sources.stats import assert_detects_scale_error, assert_unbiased, unbiasedness


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)
    return model, (lambda: F.mse_loss(model(x), y))


def _true_grad(model, closure):
    params = list(model.parameters())
    g = torch.autograd.grad(closure(), params)
    return torch.cat([t.reshape(-1) for t in g])


def _draws(source, closure, n):
    params = source.active_params()
    out = torch.empty(n, sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(n):
        source.estimate(closure)
        out[i] = torch.cat([p.grad.reshape(-1) for p in params])
    return out


def test_forward_gradient_is_unbiased():
    model, closure = _tiny()
    g = _true_grad(model, closure)
    before = [p.detach().clone() for p in model.parameters()]
    draws = _draws(gk.sources.ForwardGradient(model, seed=1), closure, 4000)
    assert_unbiased(draws, g)
    assert_detects_scale_error(draws, g)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # Each draw is (g·v)v: its component along v is exactly the directional derivative.
    assert all(type(p) is nn.Parameter for p in model.parameters())


def test_forward_gradient_guess_is_the_projection_on_the_guess():
    model, closure = _tiny()
    g = _true_grad(model, closure)
    gen = torch.Generator().manual_seed(3)
    u = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
    src = gk.sources.ForwardGradient(model, guess=lambda: u)
    src.estimate(closure)
    uf = torch.cat([t.reshape(-1) for t in u])
    want = (g @ uf) / (uf @ uf) * uf
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # The guess equal to the true gradient gives the true gradient.
    parts = list(torch.split(g, [p.numel() for p in model.parameters()]))
    exact = [t.reshape(p.shape) for t, p in zip(parts, model.parameters())]
    gk.sources.ForwardGradient(model, guess=lambda: exact).estimate(closure)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), g)


def test_likelihood_ratio_is_unbiased_for_a_noisy_linear_layer():
    # One noisy linear layer and a squared loss: E_ε L = L(noiseless) + const, so the target is autograd's.
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    closure = lambda: F.mse_loss(model(x), y)  # noqa: E731
    g = _true_grad(model, closure)
    draws = _draws(gk.sources.LikelihoodRatio(model, sigma=0.1, n_samples=2, seed=0), closure, 3000)
    assert_unbiased(draws, g)
    assert_detects_scale_error(draws, g)


def test_likelihood_ratio_is_unbiased_for_the_noisy_network():
    # Two noisy layers: the target is the gradient of the expected noisy loss, estimated independently by
    # averaging pathwise (backprop) gradients through the same noise model with many draws.
    model, closure = _tiny(1)
    sigma = 0.8
    lr = gk.sources.LikelihoodRatio(model, sigma=sigma, n_samples=2, seed=5)
    gen = torch.Generator().manual_seed(11)

    def noisy(mod, inp, out):
        return out + sigma * torch.randn(out.shape, generator=gen, dtype=out.dtype)

    hooks = [m.register_forward_hook(noisy) for m in model if isinstance(m, nn.Linear)]
    params = list(model.parameters())
    path = []
    for _ in range(4000):
        path.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(closure(), params)]))
    for h in hooks:
        h.remove()
    path = torch.stack(path)
    draws = _draws(lr, closure, 4000)
    # Both are unbiased for the same vector: test the difference of means against both standard errors.
    se = torch.sqrt(draws.var(0) / len(draws) + path.var(0) / len(path))
    z = (draws.mean(0) - path.mean(0)) / se
    assert float(z.abs().max()) < 4.5, z
    # And the noise matters here (the noiseless gradient is a different target, and the test sees it).
    g0 = _true_grad(model, closure)
    assert float(((draws.mean(0) - g0) / se).abs().max()) > 4.5


def test_likelihood_ratio_on_a_conv_net_matches_autograd_on_average():
    torch.manual_seed(0)
    model = nn.Conv1d(2, 3, kernel_size=3, padding=1).double()
    x, y = torch.randn(4, 2, 7, dtype=torch.float64), torch.randn(4, 3, 7, dtype=torch.float64)
    closure = lambda: F.mse_loss(model(x), y)  # noqa: E731
    g = _true_grad(model, closure)
    draws = _draws(gk.sources.LikelihoodRatio(model, sigma=0.1, n_samples=2, seed=0), closure, 2000)
    assert_unbiased(draws, g)


def test_spsa_tends_to_the_gradient_as_eps_shrinks_and_directions_grow():
    model, closure = _tiny()
    g = _true_grad(model, closure)
    draws = _draws(gk.sources.SPSA(model, eps=1e-4, seed=1), closure, 4000)
    assert_unbiased(draws, g)
    assert_detects_scale_error(draws, g)
    # A large eps leaves an O(eps²) bias the same test detects.
    big = _draws(gk.sources.SPSA(model, eps=1.5, seed=1), closure, 1000)
    st = unbiasedness(big, g)
    assert abs(st["z_proj"]) > 4 or st["chi2_excess"] > 4, st
    # More directions: the error of one estimate falls like 1/sqrt(K).
    e2 = gk.sources.compare(gk.sources.SPSA(model, eps=1e-4, n_directions=2, seed=2), closure, n=60)
    e32 = gk.sources.compare(gk.sources.SPSA(model, eps=1e-4, n_directions=32, seed=2), closure, n=60)
    ratio = e2.relative_error_single / e32.relative_error_single
    assert 3.0 < ratio < 5.3, ratio  # sqrt(32/2) = 4
    assert e32.mean_cosine > e2.mean_cosine


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_spsa_limit_is_the_forward_gradient_on_the_same_directions(distribution):
    # With the same seed both sources regenerate the same z; as eps -> 0, the central difference equals
    # the directional derivative: SPSA(eps) = (g·z)z + O(eps²).
    model, closure = _tiny()
    fg = gk.sources.ForwardGradient(model, n_directions=3, seed=7)
    fg.estimate(closure)
    ref = [p.grad.clone() for p in model.parameters()]
    spsa = gk.sources.SPSA(model, eps=1e-5, n_directions=3, seed=7, distribution=distribution)
    spsa.estimate(closure)
    if distribution == "gaussian":
        for a, b in zip(ref, model.parameters()):
            torch.testing.assert_close(b.grad, a, rtol=1e-6, atol=1e-9)
    else:
        for p in model.parameters():
            assert set(torch.unique(p.grad.sign()).tolist()) <= {-1.0, 0.0, 1.0}


def _quadratic(theta, a_diag, b):
    return lambda: 0.5 * (a_diag * theta**2).sum() + (b * theta).sum()


def test_es_is_unbiased_for_the_smoothed_quadratic():
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(12, generator=gen, dtype=torch.float64).requires_grad_()
    a_diag = torch.rand(12, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    # f_σ(θ) = f(θ) + σ²/2 tr(A): its gradient is Aθ + b, whatever σ.
    target = (a_diag * theta + b).detach()
    es = gk.sources.ES([theta], sigma=0.5, population=2, rank_shaping=False, seed=3)
    draws = _draws(es, _quadratic(theta, a_diag, b), 4000)
    assert_unbiased(draws, target)
    assert_detects_scale_error(draws, target)
    # Without antithetic pairs the estimator is still unbiased (noisier).
    es1 = gk.sources.ES([theta], sigma=0.5, population=4, antithetic=False, rank_shaping=False, seed=3)
    assert_unbiased(_draws(es1, _quadratic(theta, a_diag, b), 2000), target)


def test_es_targets_the_smoothed_objective_not_the_raw_one():
    # f = Σθ⁴: ∇f_σ = 4θ³ + 12σ²θ differs from ∇f = 4θ³; ES must hit the first and the test must reject the second.
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_()
    sigma = 0.4
    closure = lambda: (theta**4).sum()  # noqa: E731
    smoothed = (4 * theta**3 + 12 * sigma**2 * theta).detach()
    raw = (4 * theta**3).detach()
    draws = _draws(gk.sources.ES([theta], sigma=sigma, population=2, rank_shaping=False, seed=0), closure, 4000)
    assert_unbiased(draws, smoothed)
    st = unbiasedness(draws, raw)
    assert abs(st["z_proj"]) > 4 or st["chi2_excess"] > 4, st


def test_es_rank_shaping_is_invariant_to_monotone_loss_transforms():
    model, closure = _tiny()
    a = gk.sources.ES(model, sigma=0.05, population=8, seed=4)
    a.estimate(closure)
    ga = [p.grad.clone() for p in model.parameters()]
    b = gk.sources.ES(model, sigma=0.05, population=8, seed=4)
    b.estimate(lambda: torch.exp(3 * closure()) + 7)
    for x, p in zip(ga, model.parameters()):
        assert torch.equal(x, p.grad)
    # ... and it points downhill like the gradient.
    g = _true_grad(model, closure)
    c = gk.sources.compare(gk.sources.ES(model, sigma=0.05, population=64, seed=4), closure, n=20)
    assert c.cosine > 0.5 and c.grad_norm == pytest.approx(float(g.norm()))


def test_compare_reports_exact_statistics_for_backprop():
    model, closure = _tiny()
    c = gk.sources.compare(gk.sources.Backprop(model), closure, n=3)
    assert c.cosine == pytest.approx(1.0) and c.relative_error == pytest.approx(0.0, abs=1e-12)
    assert c.variance == pytest.approx(0.0, abs=1e-20) and math.isfinite(c.grad_norm)
    with pytest.raises(ValueError, match="n"):
        gk.sources.compare(gk.sources.Backprop(model), closure, n=1)
