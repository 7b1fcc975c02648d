"""CMA-ES against pycma (the `cma` package) and the defining behaviour of CMAES / SepCMAES."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

import gradkit as gk
from gradkit.search import functions as F
from gradkit.search.cmaes import cma_weights

cma = pytest.importorskip("cma")

TARGET = 1e-8
SEEDS = range(5)
# (function, x0 value, sigma0): Hansen's usual test setting, start away from the optimum.
PROBLEMS = {"sphere": (F.sphere, 1.0, 1.0), "ellipsoid": (F.ellipsoid, 1.0, 1.0),
            "rosenbrock": (F.rosenbrock, 0.0, 0.5)}


def evals_ours(f, d, x0, sigma0, seed, budget=30_000):
    es = gk.search.CMAES(torch.full((d,), x0), sigma0, seed=seed)
    while es.nfev < budget and not es.stop():
        x = es.ask()
        es.tell(x, f(x))
        if es.best_f <= TARGET:
            return es.nfev
    return math.inf


def evals_pycma(f, d, x0, sigma0, seed, budget=30_000):
    # pycma reads seed 0 as "draw a random seed": shift by one
    es = cma.CMAEvolutionStrategy([x0] * d, sigma0, {"seed": seed + 1, "verbose": -9, "maxfevals": budget})
    while not es.stop():
        x = es.ask()
        fx = f(torch.from_numpy(np.asarray(x))).tolist()
        es.tell(x, fx)
        if min(fx) <= TARGET:
            return es.countevals
    return math.inf


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_evaluations_to_1e8_within_1_3x_of_pycma(name):
    f, x0, sigma0 = PROBLEMS[name]
    ours = [evals_ours(f, 10, x0, sigma0, s) for s in SEEDS]
    ref = [evals_pycma(f, 10, x0, sigma0, s) for s in SEEDS]
    med_ours, med_ref = statistics.median(ours), statistics.median(ref)
    assert math.isfinite(med_ref), ref
    assert med_ours <= 1.3 * med_ref, (ours, ref)


def test_default_parameters_match_pycma():
    # Same strategy parameters as pycma for d = 10 (the tutorial's Table 1 with cμ's 1/4 offset, as pycma).
    es = gk.search.CMAES(torch.zeros(10), 1.0)
    ref = cma.CMAEvolutionStrategy([0.0] * 10, 1.0, {"verbose": -9})
    params = ref.sm.parameters(ref.sp.weights.mueff, ref.popsize)
    assert es.popsize == ref.popsize == 10
    assert es.mueff == pytest.approx(ref.sp.weights.mueff, rel=1e-12)
    assert es.c1 == pytest.approx(params["c1"], rel=1e-12)
    assert es.cmu == pytest.approx(params["cmu"], rel=1e-12)
    assert es.cc == pytest.approx(ref.sp.cc, rel=1e-12)
    # pycma finalises the negative weights like the tutorial: compare all λ weights.
    np.testing.assert_allclose(es.weights.numpy(), np.asarray(ref.sp.weights), rtol=1e-10)


def test_weights_sum_and_signs():
    for lam, d in [(6, 2), (10, 10), (17, 100), (40, 5)]:
        w, mu, mueff = cma_weights(lam, d, 0.01, 0.02, active=True)
        assert sum(w[:mu]) == pytest.approx(1.0) and all(v > 0 for v in w[:mu]) and all(v <= 0 for v in w[mu:])
        w0, _, _ = cma_weights(lam, d, 0.01, 0.02, active=False)
        assert all(v == 0 for v in w0[mu:])


def test_covariance_learns_the_ellipsoid_axes():
    # On a rotated-free ellipsoid the learned C must approach the inverse Hessian (up to scale).
    d = 6
    scales = 10.0 ** torch.arange(d, dtype=torch.float64)
    es = gk.search.CMAES(torch.ones(d), 1.0, seed=0)
    for _ in range(400):
        x = es.ask()
        es.tell(x, (scales * x * x).sum(1))
    c = torch.diagonal(es.covariance) * scales
    assert float(c.max() / c.min()) < 3.0, c  # C ∝ H⁻¹ would give 1; untouched C would give 1e5


def test_sep_cmaes_solves_100d_ellipsoid():
    r = gk.search.minimize(F.ellipsoid, torch.ones(100), 1.0, method="sep_cmaes", seed=0, ftarget=1e-8,
                           budget=150_000)
    assert r.fun <= 1e-8, (r.fun, r.nfev, r.stop)
    # Full CMA-ES needs ~d² generations to learn these 100 variances; the diagonal learns (d + 2)/3 faster.
    assert r.nfev < 100_000


def test_ipop_restarts_double_population_and_solve_rastrigin():
    r = gk.search.minimize(F.rastrigin, torch.full((5,), 3.0), 2.0, seed=1, ftarget=1e-8, budget=100_000,
                           restarts=8)
    es = r.searcher
    assert es.restarts_done >= 1 and es.popsize == gk.search.CMAES(torch.zeros(5), 1.0).popsize * 2 ** es.restarts_done
    assert r.fun <= 1e-8
    # Without restarts the same start gets stuck in a local optimum of Rastrigin.
    r0 = gk.search.minimize(F.rastrigin, torch.full((5,), 3.0), 2.0, seed=1, ftarget=1e-8, budget=100_000)
    assert r0.fun > 0.5 and "ftarget" not in r0.stop


def test_termination_on_flat_function():
    es = gk.search.CMAES(torch.zeros(3), 1.0, seed=0)
    for _ in range(60):
        x = es.ask()
        es.tell(x, torch.zeros(len(x)))
        if es.stop():
            break
    assert es.stop() and "tolfun" in es.stop_reasons()


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma0"):
        gk.search.CMAES(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="restarts"):
        gk.search.CMAES(torch.zeros(3), 1.0, restarts=-1)
    with pytest.raises(ValueError, match="incpopsize"):
        gk.search.CMAES(torch.zeros(3), 1.0, incpopsize=1.0)
    with pytest.raises(ValueError, match="restart_from"):
        gk.search.CMAES(torch.zeros(3), 1.0, restart_from="uniform")
