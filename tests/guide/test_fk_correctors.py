"""Feynman–Kac correctors: CFG's SDE with the FKC weights reaches the tilted target N(μ*, σ*²) of two 1-D Gaussians
(closed form), where plain CFG does not."""

import pytest
import torch

import gradkit.guide as G

from .helpers import TwoModels, noise

f64 = torch.float64
MC, SC, MU, SU = 1.5, 0.8, 0.0, 1.0          # σ*² = 0.4706 < 2·Var_CFG = 0.82: weights of finite variance
MODEL = TwoModels(G.toy.gaussian([MC], [SC**2]), G.toy.gaussian([MU], [SU**2]))


def target(beta):
    var = 1.0 / (beta / SC**2 + (1 - beta) / SU**2)
    return var * (beta * MC / SC**2 + (1 - beta) * MU / SU**2), var


def weighted_moments(x, logw):
    w = torch.softmax(logw, 0)
    m = (w * x[:, 0]).sum()
    return float(m), float((w * (x[:, 0] - m) ** 2).sum())


def test_fkc_weighted_cfg_reaches_the_tilted_gaussian_where_cfg_does_not():
    # the probability-flow version (g = 0, Heun for the states): the weights are then exactly q_1/ρ_1 along each
    # path (ρ = the density CFG transports), i.e. self-normalised importance sampling of the target
    beta = 2.0
    mu, var = target(beta)
    x0 = noise(20000, 1, 1)
    fkc = G.FKCorrector(beta, final_resample=False)
    x = G.sample(MODEL, x0, cond=1, guidance=fkc, steps=100, method="heun")
    m, v = weighted_moments(x, fkc.final_log_weights)
    assert abs(m - mu) < 0.04 and abs(v - var) < 0.04, (m, v, mu, var)
    cfg = G.sample(MODEL, x0, cond=1, guidance=G.CFG(beta), steps=100, method="heun")
    assert abs(float(cfg.mean()) - mu) > 0.3                     # CFG's law is another Gaussian:
    assert abs(float(cfg.var()) - (SU ** (1 - beta) * SC**beta) ** 2) < 0.02   # std s_u^{1−β}·s_c^β


def test_fkc_sde_with_resampling_every_step():
    # the SDE version resamples; Euler–Maruyama leaves a discretisation bias that shrinks slowly with the steps
    # (≈ 0.04 in the mean at 200 steps here), far below CFG's 0.4
    beta = 2.0
    mu, var = target(beta)
    fkc = G.FKCorrector(beta, adaptive=False)
    x = G.sample(MODEL, noise(20000, 1, 2), cond=1, guidance=fkc, steps=200, method="sde", seed=2)
    assert len(fkc.ancestry) == 200
    assert abs(float(x.mean()) - mu) < 0.08 and abs(float(x.var()) - var) < 0.08, (float(x.mean()), float(x.var()))


def test_beta_one_gives_no_weights_and_the_reference_mode_runs():
    fkc = G.FKCorrector(1.0, final_resample=False)
    G.sample(MODEL, noise(64, 1, 3), cond=1, guidance=fkc, steps=10, method="sde")
    assert torch.equal(fkc.final_log_weights, torch.zeros(64, dtype=f64))
    ref = G.FKCorrector(2.0, reference=True)
    G.sample(MODEL, noise(64, 1, 3), cond=1, guidance=ref, steps=10, method="sde")
    assert [s for s, _ in ref.ancestry] == list(range(9))        # every step but the last


def test_bad_arguments():
    with pytest.raises(ValueError, match="clip"):
        G.FKCorrector(2.0, clip=0.0)
    with pytest.raises(ValueError, match="resampling"):
        G.FKCorrector(2.0, resampling="residual")
