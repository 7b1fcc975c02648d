"""FK steering on the exact Gaussian-mixture test-bed: the particles reach the tilted mixture p(x)·exp(λ·r(x))/Z.

The proposal is the mixture's exact ancestral kernel (no discretisation error), so a failure is the algorithm's.
G independent SMC runs are one batch of G groups (``n_particles`` each); tolerances come from the spread of the
runs' estimates (SMC particles within a run are correlated)."""

import functools
import math

import pytest
import torch

import gradkit.guide as G
from gradkit.errors import NonFiniteError

from .helpers import noise

f64 = torch.float64
GMM = G.toy.asymmetric()                       # 0.7 / 0.3, full covariances
A = torch.tensor([1.0, -0.5], dtype=f64)


def exact_kernel(gmm, x, t, t_next, cond, generator):
    return gmm.ancestral(x, [t, t_next], cond, generator=generator)


PROPOSAL = functools.partial(exact_kernel, GMM)


def linear(x):
    return x @ A


def run(reward, lam, N, M, *, seed=0, steps=10, **kw):
    fk = G.FKSteering(reward, lam, n_particles=N, proposal=PROPOSAL, seed=seed, final_resample=False, **kw)
    x = G.sample(GMM, noise(M * N, 2, seed), guidance=fk, steps=steps, seed=seed)
    w = torch.softmax(fk.final_log_weights.reshape(M, N), 1)
    return fk, x.reshape(M, N, 2), w


def component0(tilt, x, w):
    """Per-run weighted estimate of the tilted mixture's first weight: E[γ'_0(x)] = π'_0 exactly."""
    gam = tilt.responsibilities(x.reshape(-1, 2), 1.0)[:, 0].reshape(w.shape)
    return (w * gam).sum(1)


def within(est, true, k=4.0):
    se = est.std() / math.sqrt(est.numel())
    return abs(float(est.mean()) - float(true)) <= k * float(se), (float(est.mean()), float(true), float(se))


def test_linear_reward_reaches_the_tilted_mixture_and_the_error_shrinks_with_n():
    lam = 1.0
    tilt = GMM.tilt_linear(A, lam)              # weights π_k exp(λaᵀμ_k + ½λ²aᵀΣ_k a), means μ_k + λΣ_k a
    _, xs, ws = run(linear, lam, 16, 200, potential="diff", seed=1)
    _, xl, wl = run(linear, lam, 1024, 20, potential="diff", seed=2)
    small, large = component0(tilt, xs, ws), component0(tilt, xl, wl)
    ok, info = within(large, tilt.weights[0])
    assert ok, info
    mean = (wl[..., None] * xl).sum(1)          # per-run weighted mean
    for d in range(2):
        ok, info = within(mean[:, d], tilt.mean()[d])
        assert ok, (d, info)
    rmse = [float(((e - tilt.weights[0]) ** 2).mean().sqrt()) for e in (small, large)]
    assert rmse[1] < rmse[0] / 3, rmse
    assert abs(float(tilt.weights[0]) - 0.7) > 0.5          # the tilt moves a lot: the test has power


@pytest.mark.parametrize("potential", ["diff", "max", "sum", "rt"])
def test_every_potential_reaches_the_same_limit(potential):
    # max / sum / rt over-tilt the intermediate targets (their running products grow with the number of potential
    # steps) and need far more particles than diff for the same accuracy; with λ = 0.5 and potentials at steps
    # 2, 5, 8 (+ the final correction) N = 1024 is enough for all four
    lam = 0.5
    tilt = GMM.tilt_linear(A, lam)
    _, x, w = run(linear, lam, 1024, 20, potential=potential, resample_every=3, resample_start=2, seed=3)
    ok, info = within(component0(tilt, x, w), tilt.weights[0])
    assert ok, info


def test_quadratic_reward_reaches_the_tilted_mixture():
    Q = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=f64)
    b = torch.tensor([1.0, -1.0], dtype=f64)
    lam = 1.0

    def quad(x):
        d = x - b
        return -0.5 * ((d @ Q) * d).sum(1)

    tilt = GMM.tilt_quadratic(Q, b, lam)
    _, x, w = run(quad, lam, 1024, 20, potential="diff", seed=4)
    ok, info = within(component0(tilt, x, w), tilt.weights[0])
    assert ok, info
    mean = (w[..., None] * x).sum(1)
    for d in range(2):
        ok, info = within(mean[:, d], tilt.mean()[d])
        assert ok, (d, info)


def test_final_resampling_returns_equally_weighted_tilted_particles():
    lam = 1.0
    tilt = GMM.tilt_linear(A, lam)
    N, M = 512, 30
    fk = G.FKSteering(linear, lam, potential="diff", n_particles=N, proposal=PROPOSAL, seed=6)
    x = G.sample(GMM, noise(M * N, 2, 6), guidance=fk, steps=10, seed=6).reshape(M, N, 2)
    assert fk.ancestry and fk.ancestry[-1][0] == 9              # the last step resampled
    assert torch.equal(fk.log_weights, torch.zeros(M * N, dtype=f64))
    ok, info = within(x.mean(1)[:, 0], tilt.mean()[0])
    assert ok, info


def test_log_normalizer_is_an_unbiased_estimate_of_z():
    lam = 1.0
    quad = 0.5 * lam**2 * torch.einsum("d,kde,e->k", A, GMM.covs, A)
    Z = float((GMM.weights * torch.exp(lam * GMM.means @ A + quad)).sum())
    fk, _, _ = run(linear, lam, 64, 300, potential="diff", seed=7)
    ok, info = within(torch.exp(fk.log_normalizer), Z)
    assert ok, info


def test_nonfinite_rewards_follow_the_policy():
    def bad(x):
        r = x[:, 0].clone()
        r[1] = math.nan
        return r

    x0 = noise(8, 2, 8)
    with pytest.raises(NonFiniteError, match=r"rows \[1\]"):
        G.sample(GMM, x0, guidance=G.FKSteering(bad, 1.0, proposal=PROPOSAL), steps=4)
    fk = G.FKSteering(bad, 1.0, proposal=PROPOSAL, on_nonfinite="worst", adaptive=False)
    G.sample(GMM, x0, guidance=fk, steps=4)
    for _, anc in fk.ancestry:                                 # weight 0: never an ancestor
        assert not bool((anc == 1).any())
    with pytest.raises(ValueError, match="skip"):
        G.FKSteering(bad, 1.0, on_nonfinite="skip")

    def all_bad(x):
        return torch.full((x.shape[0],), math.nan, dtype=x.dtype)

    with pytest.raises(NonFiniteError, match="group"):
        G.sample(GMM, x0, guidance=G.FKSteering(all_bad, 1.0, proposal=PROPOSAL, on_nonfinite="worst"), steps=3)


def test_run_uses_the_samplers_sde_step_bit_for_bit():
    # with λ = 0 nothing is ever resampled: run()'s own SDE step (population-wide noise) equals the sampler's
    ring = G.toy.ring(6)
    x0 = noise(12, 2, 9)
    plain = G.sample(ring, x0, steps=15, method="sde", seed=4, g=0.7)
    fk = G.FKSteering(linear, 0.0, final_resample=False)
    out = fk.run(ring, x0, steps=15, seed=4, g=0.7)
    assert torch.equal(out.x, plain)
    assert fk.ancestry == []


def test_velocity_cache_saves_the_potential_evaluations():
    # textbook potentials evaluate x̂1 at the new state; the next step reuses that velocity, so the NFE per sample
    # is one per step (plus none at t = 1, where x̂1 = x)
    ring = G.toy.ring(6)
    fk = G.FKSteering(linear, 0.5)
    out = fk.run(ring, noise(16, 2, 10), steps=12, seed=1)
    assert out.nfe == 12.0
    fk = G.FKSteering(linear, 0.5, reference=True)
    assert fk.run(ring, noise(16, 2, 10), steps=12, seed=1).nfe == 12.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="potential"):
        G.FKSteering(linear, 1.0, potential="add")
    with pytest.raises(ValueError, match="lam"):
        G.FKSteering(linear, -1.0)
    with pytest.raises(ValueError, match="ess_threshold"):
        G.FKSteering(linear, 1.0, ess_threshold=1.5)
    with pytest.raises(ValueError, match="resampling"):
        G.FKSteering(linear, 1.0, resampling="stratified")
    with pytest.raises(ValueError, match="reward"):
        G.FKSteering(3.0, 1.0)
    with pytest.raises(ValueError, match="multiple of n_particles"):
        G.sample(GMM, noise(6, 2), guidance=G.FKSteering(linear, 1.0, n_particles=4), steps=2)
    with pytest.raises(ValueError, match="one value per sample"):
        G.sample(GMM, noise(4, 2), guidance=G.FKSteering(lambda x: x.sum(), 1.0), steps=2)
