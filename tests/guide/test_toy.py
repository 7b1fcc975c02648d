"""The exact Gaussian-mixture test-bed: posterior, classifier, ancestral sampler, flow map, tilts."""

import math

import pytest
import torch

import gradkit.guide as G

from .helpers import f64, noise


def test_posterior_matches_x1_hat_and_monte_carlo():
    g = G.toy.asymmetric()
    x, t = noise(3, 2, 0), 0.6
    gam, m, cov = g.posterior(x, t)
    assert torch.allclose((gam[..., None] * m).sum(1), g.x1_hat(x, t), atol=1e-13)
    # Bayes by sampling: draw x1 from the data, x_t = (1−t)x0 + t x1, and keep the x_t near x[0] via weights
    x1, _ = g.sample(200_000, seed=1)
    # p(x1 | x_t = x) ∝ p(x1)·N(x; t x1, (1−t)² I): self-normalised importance weights
    logw = -0.5 * ((x[0] - t * x1) ** 2).sum(1) / (1 - t) ** 2
    w = torch.softmax(logw, 0)
    mc_mean = (w[:, None] * x1).sum(0)
    ess = 1.0 / (w * w).sum()
    mix_mean = (gam[0, :, None] * m[0]).sum(0)
    d = m[0] - mix_mean
    mix_cov = (gam[0, :, None, None] * (cov[0] + d[:, :, None] * d[:, None, :])).sum(0)
    se = (mix_cov.diagonal() / ess).sqrt()
    assert bool(((mc_mean - mix_mean).abs() < 5 * se).all())


def test_class_log_probs_is_the_exact_noise_aware_classifier():
    g = G.toy.ring(6, classes="parity")
    x, t = noise(5, 2, 2), 0.4
    lp = g.class_log_probs(x, t)
    assert torch.allclose(lp.exp().sum(1), torch.ones(5, dtype=f64), atol=1e-14)
    # Bayes: p_t(c | x) = π_c p_t(x | c) / p_t(x)
    for c in (0, 1):
        pc = float(g.component_weights()[g.classes == c].sum())
        ref = math.log(pc) + g.log_prob(x, t, c) - g.log_prob(x, t)
        assert torch.allclose(lp[:, c], ref, atol=1e-12)


def test_conditional_velocity_is_the_sub_mixture_velocity():
    g = G.toy.ring(6, classes="parity")
    x, t = noise(4, 2, 3), 0.7
    for c in (0, 1):
        assert torch.allclose(g(x, t, c), g.subset(c)(x, t), atol=1e-13)
    rows = torch.tensor([0, 1, 1, 0])
    v = g(x, t, rows)
    for i in range(4):
        assert torch.allclose(v[i], g.subset(int(rows[i]))(x[i:i + 1], t)[0], atol=1e-13)


def test_ancestral_sampler_is_exact_in_five_steps():
    g = G.toy.asymmetric()
    n = 20_000
    x = g.ancestral(noise(n, 2, 4), torch.linspace(0, 1, 6), seed=5)
    se = (g.cov().diagonal() / n).sqrt()
    assert bool(((x.mean(0) - g.mean()).abs() < 4.5 * se).all())
    emp = torch.cov(x.T)
    se_cov = ((g.cov().diagonal()[:, None] * g.cov().diagonal()[None, :] + g.cov() ** 2) / n).sqrt()
    assert bool(((emp - g.cov()).abs() < 6 * se_cov).all())
    frac = (g.responsibilities(x, 1.0).argmax(1) == 0).double().mean()
    # components overlap a little: compare with the exact probability of being classified 0
    xs, _ = g.sample(200_000, seed=9)
    p0 = (g.responsibilities(xs, 1.0).argmax(1) == 0).double().mean()
    assert abs(float(frac - p0)) < 4.5 * math.sqrt(float(p0 * (1 - p0)) / n) + 4.5 * math.sqrt(0.25 / 200_000)


def test_gaussian_flow_map_closed_form_matches_the_ode():
    g = G.toy.gaussian([1.0, -2.0], [[2.0, 0.6], [0.6, 0.5]])
    x0 = noise(5, 2, 6)
    phi = g.flow_map(x0)
    lam, U = torch.linalg.eigh(g.covs[0])
    assert torch.allclose(phi, g.means[0] + x0 @ (U @ torch.diag(lam.sqrt()) @ U.T), atol=1e-13)
    assert torch.allclose(G.sample(g, x0, method="rk4", steps=100), phi, atol=1e-8)
    assert torch.allclose(g.flow_map(phi, 1.0, 0.0), x0, atol=1e-13)


def test_gmm_flow_map_inverse_round_trip():
    g = G.toy.ring(4, std=0.5)
    x0 = noise(6, 2, 7)
    y = g.flow_map(x0, steps=80)
    back = g.flow_map(y, 1.0, 0.0, steps=80)
    assert torch.allclose(back, x0, atol=1e-5)


def test_linear_tilt_by_importance_sampling():
    g = G.toy.asymmetric()
    a, lam = torch.tensor([0.8, -0.5], dtype=f64), 1.3
    tg = g.tilt_linear(a, lam)
    x, _ = g.sample(400_000, seed=11)
    w = torch.softmax(lam * x @ a, 0)
    assert torch.allclose((w[:, None] * x).sum(0), tg.mean(), atol=0.02)
    assert torch.allclose(tg.means, g.means + lam * (g.covs @ a), atol=1e-14)


def test_quadratic_tilt_matches_the_density_product():
    g = G.toy.asymmetric()
    Q = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=f64)
    b, lam = torch.tensor([0.5, 0.5], dtype=f64), 0.7
    tg = g.tilt_quadratic(Q, b, lam)
    x = noise(50, 2, 12) * 2
    lp = g.log_prob(x) - 0.5 * lam * torch.einsum("nd,de,ne->n", x - b, Q, x - b)
    diff = tg.log_prob(x) - lp  # equal up to the normalising constant
    assert float(diff.max() - diff.min()) < 1e-11
    # a singular Q (reward on one coordinate only) works too
    Q1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=f64)
    d1 = G.toy.asymmetric().tilt_quadratic(Q1, b, lam).log_prob(x) - (
        g.log_prob(x) - 0.5 * lam * (x[:, 0] - b[0]) ** 2)
    assert float(d1.max() - d1.min()) < 1e-11


def test_gmm_bad_arguments():
    with pytest.raises(ValueError, match="means"):
        G.toy.GMM([0.5, 0.5], [[0.0, 0.0]], [1.0])
    with pytest.raises(ValueError, match="positive definite"):
        G.toy.GMM([1.0], [[0.0]], [[-1.0]])
    g = G.toy.ring(4, classes="parity")
    with pytest.raises(ValueError, match="class labels"):
        g(noise(2, 2), 0.5, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="classes"):
        G.toy.ring(4, classes="odd")
