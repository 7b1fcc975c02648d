"""Best-of-N on the exact mixture sampler: the selected reward follows the order-statistics law F^N (KS test); the
soft version approaches the tilted mixture; selection, distribution over groups, non-finite policy."""

import math

import pytest
import torch

import gradkit.guide as G
from gradkit.errors import NonFiniteError

from .helpers import noise

stats = pytest.importorskip("scipy.stats", reason="scipy gives the KS test and the normal CDF")

f64 = torch.float64
GMM = G.toy.asymmetric()
A = torch.tensor([1.0, -0.5], dtype=f64)


def kernel(x, t, t_next, cond, generator):
    return GMM.ancestral(x, [t, t_next], cond, generator=generator)


def linear(x):
    return x @ A


def reward_cdf(r):
    """CDF of R = aᵀx1 under the mixture: Σ_k π_k Φ((r − aᵀμ_k)/√(aᵀΣ_k a))."""
    m = (GMM.means @ A).numpy()
    s = torch.einsum("d,kde,e->k", A, GMM.covs, A).sqrt().numpy()
    w = GMM.weights.numpy()
    return sum(w[k] * stats.norm.cdf((r - m[k]) / s[k]) for k in range(len(w)))


def test_selected_reward_follows_the_order_statistics_law():
    N, M = 8, 600
    bon = G.BestOfN(linear, N, proposal=kernel)
    x = G.sample(GMM, noise(N * M, 2, 1), guidance=bon, steps=4, seed=1)
    best = linear(bon.select(x)).numpy()
    assert bon.chosen.shape == (M,)
    assert torch.equal(bon.rewards[bon.chosen], torch.as_tensor(best))
    p = stats.kstest(best, lambda r: reward_cdf(r) ** N).pvalue
    assert p > 1e-3, p
    # the test has power: the law of a best-of-N/2 is rejected
    assert stats.kstest(best, lambda r: reward_cdf(r) ** (N // 2)).pvalue < 1e-6
    # and the candidates themselves are exact draws (the law of one reward)
    assert stats.kstest(linear(x).numpy(), reward_cdf).pvalue > 1e-3


def test_soft_best_of_n_approaches_the_tilted_mixture():
    lam, N, M = 1.0, 256, 400
    tilt = GMM.tilt_linear(A, lam)
    bon = G.BestOfN(linear, N, mode="soft", lam=lam, proposal=kernel, seed=3)
    x = G.sample(GMM, noise(N * M, 2, 2), guidance=bon, steps=3, seed=2)
    sel = bon.select(x)
    gam0 = tilt.responsibilities(sel, 1.0)[:, 0]
    se = float(gam0.std()) / math.sqrt(M)
    assert abs(float(gam0.mean()) - float(tilt.weights[0])) < 4 * se + 0.02, (float(gam0.mean()), tilt.weights)
    assert abs(float(sel[:, 0].mean()) - float(tilt.mean()[0])) < 4 * float(sel[:, 0].std()) / math.sqrt(M) + 0.05


def test_run_returns_the_chosen_samples_and_works_with_any_method():
    ring = G.toy.ring(6)
    bon = G.BestOfN(linear, 4)
    out = bon.run(ring, noise(12, 2, 5), steps=10, method="heun")
    assert out.x.shape == (3, 2)
    assert torch.allclose(linear(out.x), out.info["best_reward"])
    assert torch.equal(out.info["best_reward"], bon.rewards.reshape(3, 4).max(1).values)
    assert out.nfe == 20.0


def test_nonfinite_rewards():
    def bad(x):
        r = x[:, 0].clone()
        r[0] = math.inf
        return r

    ring = G.toy.ring(4)
    with pytest.raises(NonFiniteError):
        G.sample(ring, noise(4, 2), guidance=G.BestOfN(bad, 4), steps=2)
    bon = G.BestOfN(bad, 4, on_nonfinite="worst")
    G.sample(ring, noise(4, 2), guidance=bon, steps=2)
    assert int(bon.chosen[0]) != 0
    with pytest.raises(ValueError, match="skip"):
        G.BestOfN(bad, 4, on_nonfinite="skip")
    with pytest.raises(ValueError, match="mode"):
        G.BestOfN(bad, 4, mode="greedy")
    with pytest.raises(ValueError, match="n must"):
        G.BestOfN(bad, 0)
