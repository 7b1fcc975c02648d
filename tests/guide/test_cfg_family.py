"""Exact oracles of the classifier-free family: CFG, CFG-Zero*, APG, CFG++, interval, Adaptive Guidance,
Autoguidance, GFCG — and classifier guidance ≡ CFG with the exact noise-aware classifier."""

import math

import numpy as np
import pytest
import torch

import gradkit.guide as G
from gradkit.guide import _convert as C

from .helpers import TwoModels, affine_map, endpoint_law, f64, gauss_legendre, noise

M_U = torch.tensor([-1.0, 0.5], dtype=f64)
M_C = torch.tensor([1.5, -0.5], dtype=f64)
SIGMA = torch.tensor([[0.6, 0.25], [0.25, 0.4]], dtype=f64)


def equal_cov_models():
    return TwoModels(G.toy.gaussian(M_C, SIGMA), G.toy.gaussian(M_U, SIGMA))


# ----------------------------------------------------------------------------------------------------------- CFG
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, 5.5])
@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_cfg_equal_covariance_is_the_sampler_of_the_combined_gaussian(w, method):
    """Affine-combination lemma: CFG's velocity *is* the velocity of N((1−w)m_u + w·m_c, Σ), so every solver step is
    the same affine map; the endpoint law is pushed exactly (no Monte Carlo)."""
    model = equal_cov_models()
    target = G.toy.gaussian((1 - w) * M_U + w * M_C, SIGMA)
    run_cfg = lambda z: G.sample(model, z, cond=1, guidance=G.CFG(w), method=method, steps=12)  # noqa: E731
    run_tgt = lambda z: G.sample(target, z, method=method, steps=12)  # noqa: E731
    A1, b1 = affine_map(run_cfg, 2)
    A2, b2 = affine_map(run_tgt, 2)
    assert torch.allclose(A1, A2, atol=1e-12) and torch.allclose(b1, b2, atol=1e-12)


def test_cfg_equal_covariance_endpoint_is_exact():
    w = 3.0
    m, S = endpoint_law(lambda z: G.sample(equal_cov_models(), z, cond=1, guidance=G.CFG(w), method="rk4",
                                           steps=60), 2)
    assert torch.allclose(m, (1 - w) * M_U + w * M_C, atol=1e-8)
    assert torch.allclose(S, SIGMA, atol=1e-8)


def test_cfg_formulations_map_onto_each_other():
    model, x = equal_cov_models(), noise(4, 2)
    a = G.guided_velocity(G.CFG(3.0), model, x, 0.4, cond=1)
    b = G.guided_velocity(G.CFG(2.0, formulation="original"), model, x, 0.4, cond=1)
    assert torch.allclose(a, b, atol=1e-14)
    # w = 1 (diffusers form) is the conditional model alone, with one NFE per step
    out = G.sample(model, x, cond=1, guidance=G.CFG(1.0), steps=5, full_output=True)
    assert out.nfe == 5 and torch.equal(out.x, G.sample(model, x, cond=1, steps=5))


def _cfg_1d_mean(w, m_u, s_u, m_c, s_c):
    def sig2(s, sd):
        return (1 - s) ** 2 + s * s * sd * sd

    def a(s, sd):
        return (s * sd * sd - (1 - s)) / sig2(s, sd)

    def f(s):
        return ((s_u / np.sqrt(sig2(s, s_u))) ** (1 - w) * (s_c / np.sqrt(sig2(s, s_c))) ** w
                * ((1 - w) * m_u * (1 - s * a(s, s_u)) + w * m_c * (1 - s * a(s, s_c))))

    return gauss_legendre(f, 0.0, 1.0, 400)


@pytest.mark.parametrize("w,cfg_mean,cfg_std", [(2.0, 2.0703, 0.25), (4.0, 2.2763, 0.0625)])
def test_cfg_unequal_variances_is_not_the_tilted_target(w, cfg_mean, cfg_std):
    m_u, s_u, m_c, s_c = 0.0, 1.0, 1.5, 0.5
    model = TwoModels(G.toy.gaussian([m_c], s_c ** 2), G.toy.gaussian([m_u], s_u ** 2))
    (A, b) = affine_map(lambda z: G.sample(model, z, cond=1, guidance=G.CFG(w), method="rk4", steps=100), 1)
    std, mean = float(A[0, 0]), float(b[0])
    assert abs(std - s_u ** (1 - w) * s_c ** w) < 1e-7            # s_u^{1−w}·s_c^w
    assert abs(mean - _cfg_1d_mean(w, m_u, s_u, m_c, s_c)) < 1e-7
    assert abs(mean - cfg_mean) < 1e-4 and abs(std - cfg_std) < 1e-7
    tilt_var = 1 / (w / s_c ** 2 + (1 - w) / s_u ** 2)
    tilt_mean = tilt_var * (w * m_c / s_c ** 2 + (1 - w) * m_u / s_u ** 2)
    assert abs(std - math.sqrt(tilt_var)) > 0.1 and abs(mean - tilt_mean) > 0.3


def test_cfg_scale_schedule_and_interval_weights_are_applied_at_the_right_times():
    """1-D, one variance: any schedule w(t) ends at N(m_u + κ(m_c − m_u), s²), κ = ∫ w(t)·k(t) dt with
    k(t) = (s/σ(t))(1 − t·a(t)), ∫k = 1."""
    m_u, m_c, sd = -0.5, 1.0, 0.7
    model = TwoModels(G.toy.gaussian([m_c], sd * sd), G.toy.gaussian([m_u], sd * sd))

    def k(s):
        sig2 = (1 - s) ** 2 + s * s * sd * sd
        return sd / np.sqrt(sig2) * (1 - s * (s * sd * sd - (1 - s)) / sig2)

    assert abs(gauss_legendre(k, 0, 1) - 1) < 1e-12
    # a linear schedule
    A, b = affine_map(lambda z: G.sample(model, z, cond=1, guidance=G.CFG(lambda t: 1 + 3 * t), method="rk4",
                                         steps=64), 1)
    kappa = gauss_legendre(lambda s: (1 + 3 * s) * k(s), 0, 1)
    assert abs(float(b[0]) - (m_u + kappa * (m_c - m_u))) < 1e-7 and abs(float(A[0, 0]) - sd) < 1e-7
    # CFG(w=4) on [0.25, 0.75), conditional elsewhere (grid points k/64 are exact in binary)
    rule = G.GuidanceInterval(G.CFG(4.0), start=0.25, stop=0.75)
    out = G.sample(model, noise(1, 1), cond=1, guidance=rule, method="rk4", steps=64, full_output=True)
    assert out.nfe == 4 * 64 + 4 * 32  # 4 stages; the uncond evaluations only in the interval
    A, b = affine_map(lambda z: G.sample(model, z, cond=1, guidance=rule, method="rk4", steps=64), 1)
    kappa = (gauss_legendre(k, 0, 0.25) + 4 * gauss_legendre(k, 0.25, 0.75) + gauss_legendre(k, 0.75, 1))
    assert abs(float(b[0]) - (m_u + kappa * (m_c - m_u))) < 1e-7


def test_interval_units():
    rule = G.GuidanceInterval(G.CFG(2.0), start=0.28, stop=5.42, unit="sigma")
    # EDM σ = (1 − t)/t: guided when 0.28 < σ ≤ 5.42
    assert not rule.active(0, 10, 0.1) and rule.active(0, 10, 0.2) and rule.active(0, 10, 0.78)
    assert not rule.active(0, 10, 0.79)
    steps = G.GuidanceInterval(G.CFG(2.0), start=0.2, stop=0.5, unit="steps")
    assert [i for i in range(10) if steps.active(i, 10, 0.0)] == [2, 3, 4]
    index = G.GuidanceInterval(G.CFG(2.0), start=17, stop=22, unit="index")  # the authors' inclusive step range
    assert [i for i in range(32) if index.active(i, 32, 0.0)] == list(range(17, 23))
    with pytest.raises(ValueError, match="stop"):
        G.GuidanceInterval(G.CFG(2.0), start=0.5, stop=0.2)


# ------------------------------------------------------------------------------------- classifier guidance ≡ CFG
@pytest.mark.parametrize("t", [0.05, 0.4, 0.9])
@pytest.mark.parametrize("w", [1.0, 2.5])
def test_classifier_guidance_with_the_exact_classifier_is_cfg_pointwise(t, w):
    g = G.toy.ring(6, classes="parity")
    x = noise(8, 2, 5) * 3
    labels = torch.tensor([0, 1] * 4)
    cg = G.ClassifierGuidance(g.classifier, w, t_floor=1e-9)
    ctx = G.context(g, x, t, labels)
    assert torch.allclose(cg.velocity(ctx), G.guided_velocity(G.CFG(w), g, x, t, labels), atol=1e-11)


def test_classifier_guidance_scale_one_samples_the_class():
    g = G.toy.ring(4, std=0.4, classes="parity")
    x = G.sample(g, noise(100, 2, 6), cond=0, guidance=G.ClassifierGuidance(g.classifier, 1.0, t_floor=1e-6),
                 method="rk4", steps=20)
    assert bool((g.responsibilities(x, 1.0).argmax(1) % 2 == 0).all())
    ref = G.sample(g, noise(100, 2, 6), cond=0, method="rk4", steps=20)
    assert torch.allclose(x, ref, atol=5e-3)


# --------------------------------------------------------------------------------------------------- CFG-Zero*
def test_cfg_zero_star_residual_is_orthogonal_to_the_unconditional_prediction():
    c, u = noise(6, 5, 1), noise(6, 5, 2)
    s = G.optimized_scale(c, u, eps=0.0)
    assert torch.allclose(((c - s * u) * u).sum(1), torch.zeros(6, dtype=f64), atol=1e-12)
    s_ref = G.optimized_scale(c, u)  # ε = 1e-8: orthogonal up to a relative 1e-8
    assert bool((((c - s_ref * u) * u).sum(1).abs() <= 1e-7 * (c * u).sum(1).abs()).all())
    # s* is the least-squares scale
    for b in range(6):
        grid = s[b] + torch.linspace(-1e-3, 1e-3, 11, dtype=f64)
        res = [float(((c[b] - gg * u[b]) ** 2).sum()) for gg in grid]
        assert int(np.argmin(res)) == 5


def test_cfg_zero_star_equal_predictions_give_the_conditional_one():
    rule = G.CFGZeroStar(5.0, zero_init_steps=0)
    c = noise(3, 4)
    assert torch.allclose(rule.combine(c, c), c, atol=1e-12)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_cfg_zero_star_zero_init_steps_leave_x_bit_identical(method):
    g = G.toy.ring(4, classes="parity")
    x0 = noise(5, 2)
    out = G.sample(g, x0, cond=1, guidance=G.CFGZeroStar(3.0, zero_init_steps=3), steps=10, method=method,
                   trajectory=True, full_output=True)
    for i in range(4):
        assert torch.equal(out.trajectory[i], x0)
    assert not torch.equal(out.trajectory[4], x0)
    assert out.nfe == 2 * (10 - 3) * (1 if method == "euler" else 2)


def test_cfg_zero_star_without_optimized_scale_is_cfg():
    g, x = G.toy.ring(4, classes="parity"), noise(5, 2)
    a = G.guided_velocity(G.CFGZeroStar(3.0, use_optimized_scale=False), g, x, 0.3, cond=0, step=2)
    assert torch.allclose(a, G.guided_velocity(G.CFG(3.0), g, x, 0.3, cond=0), atol=1e-14)


# ---------------------------------------------------------------------------------------------------------- APG
@pytest.mark.parametrize("space", ["x1", "native"])
def test_apg_reduces_to_cfg(space):
    g, x = G.toy.ring(6, classes="parity"), noise(5, 2, 3)
    for t in (0.2, 0.7):
        apg = G.APG(4.0, eta=1.0, momentum=0.0, norm_threshold=None, space=space)
        assert torch.allclose(G.guided_velocity(apg, g, x, t, cond=1), G.guided_velocity(G.CFG(4.0), g, x, t, cond=1),
                              atol=1e-12)


def test_apg_update_is_orthogonal_to_the_conditional_prediction_at_eta_zero():
    c, u = noise(6, 7, 1), noise(6, 7, 2)
    for form in ("paper", "diffusers"):
        p = G.APG(3.0, eta=0.0, momentum=0.0, norm_threshold=None, space="native", formulation=form).combine(c, u)
        base = c if form == "paper" else u
        assert torch.allclose(((p - base) * c).sum(1), torch.zeros(6, dtype=f64), atol=1e-12)
    # in the paper's space the orthogonality holds for the data predictions x̂1
    g, x, t = G.toy.ring(6, classes="parity"), noise(5, 2, 3), 0.5
    v = G.guided_velocity(G.APG(3.0, eta=0.0, momentum=0.0, norm_threshold=None), g, x, t, cond=1)
    p_c = C.x1_from_v(x, g(x, t, 1), t)
    assert torch.allclose(((C.x1_from_v(x, v, t) - p_c) * p_c).sum(1), torch.zeros(5, dtype=f64), atol=1e-12)


def test_apg_norm_threshold_bounds_the_update_and_momentum_accumulates():
    c, u = noise(4, 3, 1) * 10, noise(4, 3, 2)
    w, r = 5.0, 0.7
    for eta in (-1.0, 0.0, 0.5, 1.0):
        p = G.APG(w, eta=eta, momentum=0.0, norm_threshold=r, space="native").combine(c, u)
        assert bool(((p - c).norm(dim=1) <= (w - 1) * r + 1e-12).all())
    beta = -0.5
    apg = G.APG(w, eta=1.0, momentum=beta, norm_threshold=None, space="native")
    deltas = []
    for k in range(4):
        ck, uk = noise(4, 3, 10 + k), noise(4, 3, 20 + k)
        deltas.append(ck - uk)
        apg.combine(ck, uk)
    expect = sum(beta ** (3 - j) * d for j, d in enumerate(deltas))
    assert torch.allclose(apg.buffer, expect, atol=1e-13)


# -------------------------------------------------------------------------------------------------------- CFG++
def test_cfg_plus_plus_is_cfg_with_the_step_dependent_scale():
    g, x = G.toy.ring(6, classes="parity"), noise(5, 2, 4)
    lam = 0.6
    for t, tn in ((0.0, 0.05), (0.3, 0.35), (0.9, 1.0)):
        ctx = G.context(g, x, t, 1, t_next=tn)
        nxt = G.CFGPlusPlus(lam).step(ctx)
        w_eff = G.cfg_plus_plus.effective_scale(lam, t, tn)
        assert abs(w_eff - lam * tn * (1 - t) / (tn - t)) < 1e-15
        assert torch.allclose(nxt, x + (tn - t) * G.guided_velocity(G.CFG(w_eff), g, x, t, cond=1), atol=1e-12)
    # λ = 0 is the unconditional sampler (and costs one NFE per step)
    out = G.sample(g, x, cond=1, guidance=G.CFGPlusPlus(0.0), steps=8, full_output=True)
    assert out.nfe == 8 and torch.allclose(out.x, G.sample(g, x, steps=8), atol=1e-13)


def test_cfg_plus_plus_matches_the_authors_ddim_formula_on_a_vp_model():
    """The authors' DDIM CFG++ step re-typed on a cosine-VP ε-model (the exact GMM's ε), against the flow form."""
    g = G.toy.ring(4, classes="parity")

    def eps(z, tau, cond=None):
        a, s = torch.cos(math.pi * tau / 2), torch.sin(math.pi * tau / 2)
        x, t = C.path_from_vp(z, a[:, None], s[:, None])
        return C.x0_from_v(x, g(x, t[:, 0], cond), t)

    model = G.FlowModel(eps, "epsilon", time_fn=G.vp_cosine_time)
    times = torch.linspace(0.02, 0.98, 13, dtype=f64)
    lam, cond = 0.7, torch.tensor([0, 1, 1])
    x = noise(3, 2, 8) * (1 - float(times[0]))
    ours = G.sample(model, x, cond=cond, guidance=G.CFGPlusPlus(lam), times=times)
    # authors: ε_λ = ε_u + λ(ε_c − ε_u); x̂ = (z − √(1−ᾱ)ε_λ)/√ᾱ; z′ = √ᾱ′·x̂ + √(1−ᾱ′)·ε_u
    a, s = C.vp_alpha_sigma(times)
    z = x * (a[0] + s[0])
    for i in range(12):
        tau = G.vp_cosine_time(torch.full((3,), float(times[i]), dtype=f64))
        e_u, e_c = eps(z, tau, None), eps(z, tau, cond)
        e_l = e_u + lam * (e_c - e_u)
        x_hat = (z - s[i] * e_l) / a[i]
        z = a[i + 1] * x_hat + s[i + 1] * e_u
    assert torch.allclose(ours, z / (a[-1] + s[-1]), atol=1e-12)


def test_cfg_plus_plus_equal_covariance_endpoint_is_gaussian_with_a_pushed_mean():
    model = equal_cov_models()
    # the linear part is the unguided sampler's, so the covariance is unchanged and the mean moves along m_c − m_u
    A1, b1 = affine_map(lambda z: G.sample(model, z, cond=1, guidance=G.CFGPlusPlus(0.8), steps=40), 2)
    A0, b0 = affine_map(lambda z: G.sample(G.toy.gaussian(M_U, SIGMA), z, steps=40), 2)
    assert torch.allclose(A1, A0, atol=1e-12)
    d = b1 - b0
    assert abs(float(d[0] * (M_C - M_U)[1] - d[1] * (M_C - M_U)[0])) > 0  # not collinear in general: Σ-weighted
    assert float(d @ (M_C - M_U)) > 0


# ------------------------------------------------------------------------------------------- Adaptive Guidance
def test_adaptive_guidance_switches_per_sample_and_saves_nfe():
    g = G.toy.ring(6, classes="parity")
    x = noise(6, 2, 9) * 2
    cond = torch.tensor([0, 1, 0, 1, 0, 1])
    rule = G.AdaptiveGuidance(3.0, threshold=0.995)
    out = G.sample(g, x, cond=cond, guidance=rule, steps=20, full_output=True)
    sw = rule.switch_step
    assert bool((sw >= 0).all()), sw  # every sample switched
    # NFE: 1 conditional per step + 1 unconditional for each step up to and including the switch
    assert out.nfe == pytest.approx(20 + float((sw + 1).double().mean()))
    # per-sample: a sample's trajectory does not depend on its batch mates
    for i in range(6):
        one = G.sample(g, x[i:i + 1], cond=cond[i:i + 1], guidance=G.AdaptiveGuidance(3.0, threshold=0.995),
                       steps=20)
        assert torch.allclose(one, out.x[i:i + 1], atol=1e-13)
    # before its switch a sample follows CFG exactly, afterwards the conditional model
    j = int(sw.argmax())
    k = int(sw[j]) + 1
    cfg_part = G.sample(g, x[j:j + 1], cond=cond[j:j + 1], guidance=G.CFG(3.0), times=torch.linspace(0, 1, 21)[:k + 1])
    rest = G.sample(g, cfg_part, cond=cond[j:j + 1], times=torch.linspace(0, 1, 21)[k:])
    assert torch.allclose(rest, out.x[j:j + 1], atol=1e-12)


def test_adaptive_guidance_threshold_one_never_switches():
    g, x = G.toy.ring(4, classes="parity"), noise(3, 2)
    rule = G.AdaptiveGuidance(2.0, threshold=1.0)
    a = G.sample(g, x, cond=0, guidance=rule, steps=10)
    assert torch.allclose(a, G.sample(g, x, cond=0, guidance=G.CFG(2.0), steps=10), atol=1e-14)
    assert bool((rule.switch_step == -1).all())


# ---------------------------------------------------------------------------------------------- Autoguidance
def test_autoguidance_1d_endpoint_std():
    m, s_g, s_b, w = 0.3, 0.5, 0.9, 2.2
    good, bad = G.toy.gaussian([m], s_g ** 2), G.toy.gaussian([m], s_b ** 2)
    A, b = affine_map(lambda z: G.sample(good, z, guidance=G.Autoguidance(bad, w), method="rk4", steps=80), 1)
    assert abs(float(A[0, 0]) - s_b ** (1 - w) * s_g ** w) < 1e-7
    assert abs(float(b[0]) - m) < 1e-12


# -------------------------------------------------------------------------------------------------------- GFCG
def test_gfcg_constant_scale_endpoint_two_classes():
    s = 0.8
    g = G.toy.GMM([0.5, 0.5], torch.stack([M_C, M_U]), torch.stack([SIGMA, SIGMA]))
    rule = G.GFCG(lambda x1: g.class_log_probs(x1, 1.0), s, adaptive=False)
    m, S = endpoint_law(lambda z: G.sample(g, z, cond=0, guidance=rule, method="rk4", steps=60), 2)
    assert torch.allclose(m, M_C + s * (M_C - M_U), atol=1e-8) and torch.allclose(S, SIGMA, atol=1e-8)


def test_gfcg_reference_class_is_the_most_confusable_one():
    g = G.toy.ring(8, std=0.8)
    x, t = noise(10, 2, 3) * 3, 0.6
    labels = torch.arange(10) % 8
    rule = G.GFCG(lambda x1: g.class_log_probs(x1, 1.0), 1.0)
    G.guided_velocity(rule, g, x, t, cond=labels)
    probs = g.responsibilities(g.x1_hat(x, t, labels), 1.0)
    probs[torch.arange(10), labels] = -1
    assert torch.equal(rule.last_reference, probs.argmax(1))


def test_gfcg_adds_to_a_base_rule():
    g = G.toy.GMM([0.5, 0.5], torch.stack([M_C, M_U]), torch.stack([SIGMA, SIGMA]))
    x, t, s, w = noise(3, 2), 0.5, 0.5, 2.0
    rule = G.GFCG(lambda x1: g.class_log_probs(x1, 1.0), s, adaptive=False, base=G.CFG(w))
    v = G.guided_velocity(rule, g, x, t, cond=0)
    v_c, v_r, v_u = g(x, t, 0), g(x, t, 1), g(x, t)
    assert torch.allclose(v, v_u + w * (v_c - v_u) + s * (v_c - v_r), atol=1e-13)


def test_rule_argument_errors():
    with pytest.raises(ValueError, match="formulation"):
        G.CFG(2.0, formulation="paper")
    with pytest.raises(ValueError, match="zero_init_steps"):
        G.CFGZeroStar(2.0, zero_init_steps=-1)
    with pytest.raises(ValueError, match="space"):
        G.APG(2.0, space="eps")
    with pytest.raises(ValueError, match="norm_threshold"):
        G.APG(2.0, norm_threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        G.AdaptiveGuidance(2.0, threshold=1.5)
    with pytest.raises(ValueError, match="lam"):
        G.CFGPlusPlus(-0.1)
    with pytest.raises(ValueError, match="guide_model"):
        G.Autoguidance(3, 2.0)
    with pytest.raises(ValueError, match="labels"):
        G.guided_velocity(G.GFCG(lambda x: x, 1.0), G.toy.ring(4), noise(2, 2), 0.5, cond=None)
