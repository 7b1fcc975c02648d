"""CEM, SNES, PGPE and OpenAI-ES: each one's defining behaviour, and EvoTorch's implementation as the oracle."""

from __future__ import annotations

import logging
import math
import statistics

import pytest
import torch

import gradkit as gk
from gradkit.search import functions as F


def test_cem_refits_to_the_elites():
    es = gk.search.CEM(torch.zeros(4), 1.0, popsize=20, elite_ratio=0.25, seed=0)
    x = es.ask()
    f = F.sphere(x - 3)
    elites = x[torch.argsort(f)[:5]]
    es.tell(x, f)
    torch.testing.assert_close(es.mean, elites.mean(0), rtol=0, atol=1e-15)
    torch.testing.assert_close(es.sigma, elites.std(0, correction=0), rtol=0, atol=1e-15)
    # smoothing keeps a fraction α of the old distribution
    sm = gk.search.CEM(torch.zeros(4), 1.0, popsize=20, elite_ratio=0.25, smoothing=0.5, seed=0)
    sm.tell(x, f)
    torch.testing.assert_close(sm.mean, 0.5 * elites.mean(0), rtol=0, atol=1e-15)
    torch.testing.assert_close(sm.sigma, 0.5 + 0.5 * elites.std(0, correction=0), rtol=0, atol=1e-15)


def test_cem_solves_sphere_d10():
    r = gk.search.minimize(F.sphere, torch.ones(10), 1.0, method="cem", seed=0, ftarget=1e-8, budget=20_000)
    assert r.fun <= 1e-8


def test_snes_solves_sphere_d10_and_adapts_sigma_per_coordinate():
    r = gk.search.minimize(F.sphere, torch.ones(10), 1.0, method="snes", seed=0, ftarget=1e-8, budget=5_000)
    assert r.fun <= 1e-8
    # On a separable ellipsoid SNES's per-coordinate σ must follow the curvature: small where it is steep.
    es = gk.search.SNES(torch.ones(5), 1.0, seed=0)
    for _ in range(300):
        x = es.ask()
        es.tell(x, F.ellipsoid(x, 1e4))
    s = es.sigma
    assert bool((s[1:] < s[:-1]).all()), s


def test_openai_es_gradient_is_the_smoothed_gradient():
    # On a linear function the rank-based estimate points along the true gradient.
    es = gk.search.OpenAIES(torch.zeros(8), 0.1, popsize=2000, seed=0)
    a = torch.linspace(-1, 1, 8, dtype=torch.float64)
    x = es.ask()
    g = es.gradient(x, x @ a)
    cos = float(g @ a / (g.norm() * a.norm()))
    # cosine error of a 1000-pair estimate is O(sqrt(d / n)) ≈ 0.09
    assert cos > 0.95, cos


@pytest.mark.parametrize("method", ["snes", "pgpe", "openai_es"])
def test_gradient_methods_improve_on_a_smooth_function(method):
    def f(x):
        return F.ellipsoid(x, 100.0)

    f0 = float(f(torch.ones(1, 10)))
    r = gk.search.minimize(f, torch.ones(10), 0.1, method=method, seed=0, budget=3_000)
    # the mean itself moved downhill (not just one lucky sample) by two orders of magnitude; with the fixed
    # σ = 0.1 OpenAI-ES's samples cannot go below ≈ σ²·Σ scales ≈ 0.25, its mean reaches ≈ 0.2
    assert float(f(r.searcher.mean[None])) < 1e-2 * f0, r.fun


def test_pgpe_pairs_are_symmetric_and_sigma_change_is_bounded():
    es = gk.search.PGPE(torch.ones(3), torch.tensor([0.5, 1.0, 2.0]), popsize=6, seed=0)
    x = es.ask()
    torch.testing.assert_close(x[0::2] + x[1::2], 2 * es.mean.expand(3, 3))
    s0 = es.sigma.clone()
    es.tell(x, F.sphere(x))
    assert bool(((es.sigma - s0).abs() <= 0.2 * s0 + 1e-15).all())
    with pytest.raises(ValueError, match="popsize"):
        gk.search.PGPE(torch.ones(3), 1.0, popsize=7)
    with pytest.raises(ValueError, match="optimizer"):
        gk.search.PGPE(torch.ones(3), 1.0, optimizer="rmsprop")


# ---- EvoTorch as the oracle -------------------------------------------------------------------------------
D, TARGET = 10, 1e-6


def _evotorch_evals(make, seed, budget):
    from evotorch import Problem

    torch.manual_seed(seed)
    prob = Problem("min", F.sphere, solution_length=D, initial_bounds=(-1, 1), vectorized=True,
                   dtype=torch.float64, seed=seed)
    alg, n = make(prob), 0
    while n < budget:
        alg.step()
        n += len(alg.population)
        if float(alg.population.evals.min()) <= TARGET:
            return n
    return math.inf


def _our_evals(cls, seed, budget, **kw):
    r = gk.search.minimize(F.sphere, torch.ones(D), 1.0, method=cls, seed=seed, budget=budget, ftarget=TARGET, **kw)
    return r.nfev if r.fun <= TARGET else math.inf


@pytest.fixture(scope="module")
def evotorch_algorithms():
    pytest.importorskip("evotorch")
    logging.getLogger("evotorch").setLevel(logging.WARNING)
    from evotorch.algorithms import CEM, PGPE, SNES

    return {"SNES": SNES, "CEM": CEM, "PGPE": PGPE}


def test_snes_matches_evotorch_exactly(evotorch_algorithms):
    # EvoTorch samples with torch's global generator seeded like ours and uses the same defaults
    # (popsize, η_μ = 1, η_σ = (3 + ln d)/(5√d), NES utilities): the evaluation counts agree exactly.
    SNES = evotorch_algorithms["SNES"]
    for seed in range(3):
        theirs = _evotorch_evals(lambda p: SNES(p, stdev_init=1.0, center_init=torch.ones(D)), seed, 5_000)
        ours = _our_evals(gk.search.SNES, seed, 5_000)
        assert ours == theirs


@pytest.mark.parametrize("name", ["CEM", "PGPE"])
def test_cem_and_pgpe_behave_like_evotorch(evotorch_algorithms, name):
    alg = evotorch_algorithms[name]
    if name == "CEM":
        def make(p):
            return alg(p, popsize=100, parenthood_ratio=0.2, stdev_init=1.0, center_init=torch.ones(D))
        kw, budget, seeds = {"popsize": 100, "elite_ratio": 0.2}, 10_000, range(5)
    else:
        def make(p):
            return alg(p, popsize=20, center_learning_rate=0.2, stdev_learning_rate=0.1, optimizer="adam",
                       stdev_init=1.0, center_init=torch.ones(D))
        kw, budget, seeds = {"popsize": 20, "lr_mean": 0.2, "lr_sigma": 0.1}, 25_000, range(2)
    theirs = statistics.median(_evotorch_evals(make, s, budget) for s in seeds)
    ours = statistics.median(_our_evals(getattr(gk.search, name), s, budget, **kw) for s in seeds)
    assert math.isfinite(theirs) and ours <= 1.25 * theirs and theirs <= 1.25 * ours, (ours, theirs)
