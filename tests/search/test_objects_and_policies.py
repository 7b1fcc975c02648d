"""Shaping and mean-optimizer objects, the CMA constants, the "ignore" policy, copies, partial results."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

import gradkit as gk
from gradkit.search import functions as F
from gradkit.search.cmaes import cma_constants
from gradkit.search.mean_optim import SGD, Adam
from gradkit.search.shaping import CentredRanks, NESUtilities, Raw, centred_ranks, es_weights, nes_utilities

SEARCHERS = [gk.search.CMAES, gk.search.SepCMAES, gk.search.CEM, gk.search.SNES, gk.search.PGPE,
             gk.search.OpenAIES]


def _run(es, gens, f=F.rosenbrock):
    for _ in range(gens):
        x = es.ask()
        es.tell(x, f(x))
    return es


def test_shapings_are_loss_like_and_act_along_the_population_dimension():
    f = torch.tensor([[3.0, 0.0], [1.0, 2.0], [2.0, 1.0], [float("nan"), 5.0]], dtype=torch.float64)
    r = CentredRanks()(f)
    for j in range(2):
        torch.testing.assert_close(r[:, j], centred_ranks(f[:, j]))
    assert r[3, 0] == 0.5  # NaN ranks behind every finite value
    torch.testing.assert_close(r[:, 1], torch.tensor([-0.5, 1 / 6, -1 / 6, 0.5], dtype=torch.float64))
    u = NESUtilities()(torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(u, -nes_utilities(3)[torch.tensor([2, 0, 1])])
    assert Raw()(f) is f  # passed through, NaN included
    torch.testing.assert_close(es_weights(f[:3, 1], Raw(), sigma=0.5), f[:3, 1] / 1.5)
    with pytest.raises(ValueError, match="fitness_shaping"):
        gk.search.OpenAIES(torch.zeros(3), 0.1, fitness_shaping="softmax")


def test_mean_optimizer_objects_are_the_update_rule_and_private_to_each_searcher():
    by_name = _run(gk.search.PGPE(torch.ones(4), 0.3, seed=1, optimizer="sgd", lr_mean=0.5), 5, F.sphere)
    by_object = _run(gk.search.PGPE(torch.ones(4), 0.3, seed=1, optimizer=SGD(0.5)), 5, F.sphere)
    assert torch.equal(by_name.mean, by_object.mean)
    shared = Adam(lr=0.05)
    a = _run(gk.search.OpenAIES(torch.ones(4), 0.1, seed=2, optimizer=shared), 3, F.sphere)
    b = _run(gk.search.OpenAIES(torch.ones(4), 0.1, seed=2, optimizer=shared), 3, F.sphere)
    assert torch.equal(a.mean, b.mean) and shared.t == 0 and a.mean_optimizer.t == 3
    assert a.lr == 0.05
    # OpenAI-ES with plain SGD is θ ← θ − η ĝ.
    es = gk.search.OpenAIES(torch.ones(4), 0.1, seed=3, optimizer=SGD(0.2))
    x = es.ask()
    fx = F.sphere(x)
    want = es.mean - 0.2 * es.gradient(x, fx)
    es.tell(x, fx)
    torch.testing.assert_close(es.mean, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="lr"):
        SGD(-1.0)
    with pytest.raises(ValueError, match="betas"):
        Adam(betas=(0.9, 1.5))


def test_cma_constants_come_from_one_place_and_the_diagonal_learns_faster():
    d, lam = 10, 12
    full, sep = gk.search.CMAES(torch.zeros(d), 1.0, popsize=lam), gk.search.SepCMAES(torch.zeros(d), 1.0, popsize=lam)
    k = cma_constants(d, lam)
    ks = cma_constants(d, lam, diagonal=True)
    assert (full.c1, full.cmu, full.cs, full.ds, full.cc, full.mueff) == (k.c1, k.cmu, k.cs, k.ds, k.cc, k.mueff)
    assert (sep.c1, sep.cmu, sep.cs) == (ks.c1, ks.cmu, ks.cs)
    assert sep.c1 == pytest.approx(full.c1 * (d + 2) / 3)
    assert k.cs == ks.cs and k.chi_n == ks.chi_n and sum(k.weights[: k.mu]) == pytest.approx(1.0)


@pytest.mark.parametrize("cls", SEARCHERS, ids=lambda c: c.__name__)
def test_ignore_does_not_check(cls):
    es = cls(torch.ones(4), 0.5, seed=0, on_nonfinite="ignore")
    x = es.ask()
    f = F.sphere(x)
    f[0] = float("nan")
    es.tell(x, f)  # no error, no skip
    assert es.generation == 1 and es.n_skipped == 0 and math.isfinite(es.best[1])
    with pytest.raises(ValueError, match="on_nonfinite"):
        cls(torch.ones(4), 0.5, on_nonfinite="often")


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls", SEARCHERS, ids=lambda c: c.__name__)
def test_copies_continue_identically(cls, how):
    es = _run(cls(torch.ones(5), 0.3, seed=4), 3)
    twin = copy.deepcopy(es) if how == "deepcopy" else pickle.loads(pickle.dumps(es))
    for _ in range(3):
        xa, xb = es.ask(), twin.ask()
        assert torch.equal(xa, xb)
        es.tell(xa, F.rosenbrock(xa))
        twin.tell(xb, F.rosenbrock(xb))
    assert torch.equal(es.mean, twin.mean)


def test_minimize_keeps_the_progress_when_f_fails_late():
    calls = [0]

    def flaky(x):
        calls[0] += 1
        if calls[0] == 6:
            raise OSError("simulator crashed")
        return F.sphere(x)

    with pytest.raises(OSError, match="simulator") as info:
        gk.search.minimize(flaky, torch.ones(4), 0.5, seed=0)
    partial = info.value.partial_result
    assert isinstance(partial, gk.search.SearchResult)
    assert partial.nit == 5 and len(partial.history) == 5 and partial.nfev == 5 * partial.searcher.popsize
    assert math.isfinite(partial.fun) and partial.fun == partial.history[-1][1]
    assert "simulator crashed" in partial.stop["error"]
    # The same run without the failure reaches the same point after 5 generations.
    ref = gk.search.minimize(F.sphere, torch.ones(4), 0.5, seed=0, budget=5 * partial.searcher.popsize)
    assert ref.fun == partial.fun and torch.equal(ref.x, partial.x)
