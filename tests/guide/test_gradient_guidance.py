"""Gradient guidance: DPS / TFG exactness on Gaussian data, the TFG reductions, MPGD, FlowChef's contraction,
EluCD's calibration, and the reward gradient from gradient-free sources (SPSA / ES)."""

import functools
import math

import pytest
import torch

import gradkit as gk
import gradkit.guide as G
from gradkit.guide import _convert as C

from .helpers import f64, noise

M = torch.tensor([1.0, -0.5], dtype=f64)
SIGMA = torch.tensor([[0.8, 0.3], [0.3, 0.5]], dtype=f64)
A = torch.tensor([0.7, -1.2], dtype=f64)


def linear_reward(x):
    return x @ A.to(x.dtype)


# --------------------------------------------------------------------------------------------------- DPS / TFG
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_dps_rho_term_is_the_exact_tilt_for_gaussian_data(t):
    g, lam = G.toy.gaussian(M, SIGMA), 1.7
    tilted = g.tilt_linear(A, lam)  # N(m + λΣa, Σ)
    assert torch.allclose(tilted.means[0], M + lam * SIGMA @ A, atol=1e-15)
    x = noise(5, 2, 1)
    dps = G.DPS(linear_reward, lam)
    ctx = G.context(g, x, t, t_next=t + 0.01)
    with torch.no_grad():
        step = dps.step(ctx)
    assert torch.allclose((step - x) / 0.01, tilted(x, t), atol=1e-11)


def test_dps_sampler_is_the_sampler_of_the_tilted_gaussian():
    g, lam = G.toy.gaussian(M, SIGMA), 1.7
    tilted = g.tilt_linear(A, lam)
    x = noise(4, 2, 2)
    out = G.sample(g, x, guidance=G.DPS(linear_reward, lam, t_floor=1e-7), steps=25, full_output=True)
    ref = G.sample(tilted, x, steps=25)
    # the first step evaluates the term at t_floor instead of 0 (where (1−t)/t·∇ is 0/0): an O(t_floor·h) difference
    assert torch.allclose(out.x, ref, atol=1e-7)
    assert out.nfe == 50  # one velocity + one velocity inside the gradient closure per step


def test_tfg_special_case_is_dps_bitwise():
    g, x = G.toy.asymmetric(), noise(4, 2, 3)
    tfg = G.TFG(linear_reward, scale=0.8, rho=1.0, mu=0.0, sigma=0.0, n_recur=1, rho_schedule="constant")
    a = G.sample(g, x, guidance=tfg, steps=10)
    b = G.sample(g, x, guidance=G.DPS(linear_reward, 0.8), steps=10)
    assert torch.equal(a, b)


def test_mpgd_shifts_the_data_prediction_by_the_reward_gradient():
    g, x, lam = G.toy.asymmetric(), noise(4, 2, 4), 0.3
    ctx = G.context(g, x, 0.4, t_next=0.45)
    with torch.no_grad():
        nxt = G.MPGD(linear_reward, lam, n_iter=3).step(ctx)
    # x′ = Euler step + t′·(x̂1′ − x̂1), x̂1′ = x̂1 + 3·λa for a linear reward
    assert torch.allclose(nxt, x + 0.05 * g(x, 0.4) + 0.45 * 3 * lam * A, atol=1e-13)


def test_tfg_smoothing_and_normalisation():
    g, x = G.toy.asymmetric(), noise(3, 2, 5)
    # linear reward: the smoothed log-mean-exp has the same gradient λa for any σ (the noise shifts all values)
    ctx = G.context(g, x, 0.5, t_next=0.55)
    with torch.no_grad():
        a = G.TFG(linear_reward, rho=0.0, mu=1.0, sigma=0.3, n_mc=5, mu_schedule="constant").step(ctx)
        b = G.TFG(linear_reward, rho=0.0, mu=1.0, sigma=0.0, mu_schedule="constant").step(G.context(g, x, 0.5,
                                                                                                   t_next=0.55))
    assert torch.allclose(a, b, atol=1e-12)
    # normalize divides each row by |f|
    with torch.no_grad():
        c = G.TFG(linear_reward, rho=0.0, mu=1.0, sigma=0.0, mu_schedule="constant", normalize=True).step(
            G.context(g, x, 0.5, t_next=0.55))
    f = linear_reward(g.x1_hat(x, 0.5)).abs()
    assert torch.allclose(c, x + 0.05 * g(x, 0.5) + 0.55 * A / f[:, None], atol=1e-12)


def test_tfg_recurrence_renoises_with_the_exact_forward_kernel():
    g = G.toy.asymmetric()
    t, tn, n = 0.3, 0.6, 40_000
    x1, _ = g.sample(n, seed=1)
    x_tn = (1 - tn) * noise(n, 2, 2) + tn * x1
    gen = torch.Generator().manual_seed(3)
    x_t = G.tfg.renoise(x_tn, tn, t, gen)
    ref = (1 - t) * noise(n, 2, 4) + t * x1
    se = (torch.cov(ref.T).diagonal() / n).sqrt()
    assert bool(((x_t.mean(0) - ref.mean(0)).abs() < 6 * se).all())
    assert torch.allclose(torch.cov(x_t.T), torch.cov(ref.T), atol=0.05)
    # n_recur = 2 costs twice the NFE and is reproducible from the sampler seed
    tfg = lambda: G.FreeDoM(linear_reward, 0.5, n_recur=2)  # noqa: E731
    o1 = G.sample(g, noise(3, 2), guidance=tfg(), steps=6, seed=1, full_output=True)
    o2 = G.sample(g, noise(3, 2), guidance=tfg(), steps=6, seed=1)
    assert o1.nfe == 6 * 2 * 2 and torch.equal(o1.x, o2)


# ----------------------------------------------------------------------------------------------------- FlowChef
@pytest.mark.parametrize("s,k", [(0.3, 1), (0.5, 3), (1.5, 2)])
def test_flowchef_frozen_velocity_contracts_by_one_minus_s(s, k):
    g, x, t = G.toy.asymmetric(), noise(4, 2, 6), 0.4
    y = noise(4, 2, 7)
    fc = G.FlowChef(lambda z: -0.5 * ((z - y) ** 2).sum(1), step_size=s, n_inner=k)
    ctx = G.context(g, x, t)
    v = g(x, t)
    with torch.no_grad():
        xk, vk = fc.inner(ctx, x, v)
    assert torch.equal(vk, v)
    assert torch.allclose(C.x1_from_v(xk, v, t) - y, (1 - s) ** k * (C.x1_from_v(x, v, t) - y), atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(fc.step(G.context(g, x, t, t_next=0.5)), xk + 0.1 * v, atol=1e-13)


def test_flowchef_refreshed_velocity_contraction_on_gaussian_data():
    g, t, s = G.toy.gaussian(M, SIGMA), 0.6, 0.4
    x, y = noise(3, 2, 8), noise(3, 2, 9)
    S = (1 - t) ** 2 * torch.eye(2, dtype=f64) + t * t * SIGMA
    J = t * SIGMA @ torch.linalg.inv(S)  # ∂x̂1/∂x
    fc = G.FlowChef(lambda z: -0.5 * ((z - y) ** 2).sum(1), step_size=s, n_inner=3, refresh=True)
    with torch.no_grad():
        xk, vk = fc.inner(G.context(g, x, t), x, g(x, t))
    e0 = g.x1_hat(x, t) - y
    Mx = torch.linalg.matrix_power(torch.eye(2, dtype=f64) - s * J, 3)
    assert torch.allclose(g.x1_hat(xk, t) - y, e0 @ Mx.T, atol=1e-12)
    assert torch.allclose(vk, g(xk, t), atol=1e-14)
    out = G.sample(g, x, guidance=G.FlowChef(lambda z: -((z - y) ** 2).sum(1), n_inner=2, refresh=True), steps=5,
                   full_output=True)
    assert out.nfe == 5 * 3


def test_flowchef_stop_fraction():
    g, x = G.toy.asymmetric(), noise(3, 2)
    fc = G.FlowChef(linear_reward, step_size=0.1, stop=0.5)
    out = G.sample(g, x, guidance=fc, steps=10, trajectory=True, full_output=True)
    plain = G.sample(g, out.trajectory[5], times=torch.linspace(0, 1, 11, dtype=f64)[5:])
    assert torch.allclose(out.x, plain, atol=1e-14)


# --------------------------------------------------------------------------------------------------- EluCD
def test_elucd_calibrated_ratio_and_softplus_swap():
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    soft = G.relu_to_softplus(net, beta=3.0)
    assert isinstance(soft[1], torch.nn.Softplus) and soft[1].beta == 3.0 and isinstance(net[1], torch.nn.ReLU)
    rule = G.EluCD(soft, 1.0, temperature=1.0, margin_temperature_discount=1.0)
    logits = noise(4, 3)
    labels = torch.tensor([0, 2, 1, 1])
    assert torch.allclose(rule.calibrated_log_ratio(logits, labels),
                          torch.log_softmax(logits, 1)[torch.arange(4), labels], atol=1e-14)
    g, x, t = G.toy.ring(3), noise(4, 2, 1), 0.5
    v = G.guided_velocity(rule, g, x, t, cond=labels)
    x1 = g.x1_hat(x, t).requires_grad_(True)
    (gr,) = torch.autograd.grad(torch.log_softmax(soft(x1), 1)[torch.arange(4), labels].sum(), x1)
    assert torch.allclose(v, g(x, t) + (1 - t) * gr, atol=1e-12)


# ------------------------------------------------------------------------------------------- non-finite policy
def test_nonfinite_reward_gradient_policy():
    g, x = G.toy.asymmetric(), noise(4, 2, 3)

    def bad_reward(z):  # row 1 is NaN (a constant: the other rows' gradients stay finite)
        return linear_reward(z) + torch.tensor([0.0, float("nan"), 0.0, 0.0], dtype=z.dtype)

    with pytest.raises(gk.NonFiniteError):
        G.sample(g, x, guidance=G.MPGD(bad_reward, 0.5), steps=3)
    rule = G.MPGD(bad_reward, 0.5, on_nonfinite="skip")
    out = G.sample(g, x, guidance=rule, steps=3)
    assert rule.skipped == 3 and bool(torch.isfinite(out).all())
    ref = G.sample(g, x, guidance=G.MPGD(linear_reward, 0.5), steps=3)
    plain = G.sample(g, x, steps=3)
    assert torch.allclose(out[1], plain[1], atol=1e-14) and torch.allclose(out[0], ref[0], atol=1e-14)
    with pytest.raises(ValueError, match="worst"):
        G.MPGD(linear_reward, on_nonfinite="worst")


# ------------------------------------------------------------------------------------- gradient-free sources
def _per_sample_supported(source_cls, **kw) -> bool:
    buf = torch.zeros(3, 2, dtype=f64, requires_grad=True)
    try:
        source_cls(buf, **kw).estimate(lambda: (buf * buf).sum(1))
    except ValueError:
        return False
    return True


needs_batched = pytest.mark.skipif(
    not _per_sample_supported(gk.sources.SPSA, eps=1e-3, n_directions=2),
    reason="gk.sources without per-sample (batched) closures (not available in this checkout)")


def _reward(z):
    return z @ torch.linspace(-1, 1, z.shape[1], dtype=z.dtype) + 0.3 * torch.sin(2 * z).sum(1)


def _reward_grad(z):
    return torch.linspace(-1, 1, z.shape[1], dtype=z.dtype) + 0.6 * torch.cos(2 * z)


@needs_batched
@pytest.mark.parametrize("kind", ["spsa", "es"])
def test_zeroth_order_direction_cosine_rises_with_directions(kind):
    """Row b's estimate uses only row b's loss and directions, so the B rows are B independent draws: the mean cosine
    to the exact gradient and its standard error come from them; it must rise with the number of directions K and
    match a direct simulation of the estimator's formula within that error."""
    from gradkit.guide._grad import GradientEstimator

    B, d = 200, 12
    x = noise(B, d, 1)
    exact = _reward_grad(x)
    means = []
    for K in (2, 8, 32):
        if kind == "spsa":
            src = functools.partial(gk.sources.SPSA, eps=1e-4, n_directions=K, seed=3)
        else:
            src = functools.partial(gk.sources.ES, sigma=1e-4, population=2 * K, antithetic=True,
                                    rank_shaping=False, seed=3)
        g, vals = GradientEstimator(src)(x, _reward)
        assert torch.allclose(vals, _reward(x), atol=1e-6)
        cos = torch.nn.functional.cosine_similarity(g, exact, dim=1)
        # the estimator's law for a smooth f and tiny ε: (1/K) Σ_k (z_kᵀ∇f) z_k with z_k ~ N(0, I), per row
        z = torch.randn(4000, K, d, dtype=f64, generator=torch.Generator().manual_seed(K))
        e1 = exact[0]
        sim = torch.einsum("nk,nkd->nd", z @ e1, z) / K
        ref = torch.nn.functional.cosine_similarity(sim, e1.expand_as(sim), dim=1)
        # every row has its own ∇f, but the cosine's law depends only on K and d for Gaussian directions
        se = math.sqrt(cos.var() / B + ref.var() / ref.numel())
        assert abs(float(cos.mean() - ref.mean())) < 4.5 * se, (K, float(cos.mean()), float(ref.mean()))
        means.append((float(cos.mean()), float(cos.std()) / math.sqrt(B)))
    for (m0, s0), (m1, s1) in zip(means, means[1:]):
        assert m1 - m0 > 4 * math.hypot(s0, s1), means


@needs_batched
def test_spsa_guided_endpoint_approaches_the_exact_gradient_endpoint():
    g = G.toy.ring(4, std=0.5)
    x = noise(64, 2, 5)

    def reward(z):
        return -0.5 * ((z - torch.tensor([3.0, 1.0], dtype=z.dtype)) ** 2).sum(1)

    exact = G.sample(g, x, guidance=G.MPGD(reward, 0.2, n_iter=2), steps=12)
    errs = []
    for K in (1, 4, 16, 64):
        src = functools.partial(gk.sources.SPSA, eps=1e-4, n_directions=K, seed=1)
        est = G.sample(g, x, guidance=G.MPGD(reward, 0.2, n_iter=2, source=src), steps=12)
        errs.append(float(((est - exact) ** 2).sum(1).mean()))
    assert errs[0] > errs[1] > errs[2] > errs[3], errs
    assert errs[3] < errs[0] / 10, errs


def test_gradient_source_argument_errors():
    with pytest.raises(ValueError, match="source"):
        G.ClassifierGuidance(lambda x, t: x, source=3)
    with pytest.raises(ValueError, match="t_floor"):
        G.ClassifierGuidance(lambda x, t: x, t_floor=0.0)
    with pytest.raises(ValueError, match="reward"):
        G.TFG(None)
    with pytest.raises(ValueError, match="n_recur"):
        G.TFG(linear_reward, n_recur=0)
    with pytest.raises(ValueError, match="rho_schedule"):
        G.TFG(linear_reward, rho_schedule="cosine")
    with pytest.raises(ValueError, match="one value per sample"):
        G.sample(G.toy.asymmetric(), noise(3, 2), guidance=G.MPGD(lambda z: z.sum()), steps=2)
