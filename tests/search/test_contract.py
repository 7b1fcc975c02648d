"""The ask/tell contract for every searcher exported by gk.search: shapes, seeding, state_dict, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import gradkit as gk
from gradkit.search import functions as F

SEARCHERS = [getattr(gk.search, n) for n in gk.search.__all__
             if isinstance(getattr(gk.search, n), type) and issubclass(getattr(gk.search, n), gk.search.Searcher)
             and getattr(gk.search, n) is not gk.search.Searcher]
ids = [c.__name__ for c in SEARCHERS]


def test_every_searcher_is_covered():
    assert {c.__name__ for c in SEARCHERS} == {"CMAES", "SepCMAES", "CEM", "SNES", "PGPE", "OpenAIES"}


def run(es, gens, f=F.rosenbrock):
    asked = []
    for _ in range(gens):
        x = es.ask()
        asked.append(x)
        es.tell(x, f(x))
    return asked


@pytest.mark.parametrize("cls", SEARCHERS, ids=ids)
def test_ask_shape_paper_and_best(cls):
    assert isinstance(cls.paper, str) and cls.paper
    es = cls(torch.zeros(7), 0.5, seed=0)
    x = es.ask()
    assert x.shape == (es.popsize, 7) and x.dtype == torch.float64
    assert es.best[1] == math.inf
    fx = F.sphere(x)
    es.tell(x, fx)
    bx, bf = es.best
    assert bf == float(fx.min()) and torch.equal(bx, x[int(fx.argmin())])
    assert es.nfev == es.popsize and es.generation == 1


@pytest.mark.parametrize("cls", SEARCHERS, ids=ids)
def test_same_seed_same_run_other_seed_differs(cls):
    a = run(cls(torch.ones(5), 0.3, seed=3), 5)
    b = run(cls(torch.ones(5), 0.3, seed=3), 5)
    c = run(cls(torch.ones(5), 0.3, seed=4), 5)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[-1], c[-1])


@pytest.mark.parametrize("cls", SEARCHERS, ids=ids)
def test_state_dict_mid_run_continues_identically(cls):
    es = cls(torch.ones(6), 0.4, seed=11)
    run(es, 7)
    state = es.state_dict()
    rest = run(es, 6)
    fresh = cls(torch.zeros(6), 1.0, seed=999)  # different x0/seed: everything must come from the state
    fresh.load_state_dict(state)
    rest2 = run(fresh, 6)
    assert all(torch.equal(u, v) for u, v in zip(rest, rest2))
    assert fresh.best[1] == es.best[1] and fresh.nfev == es.nfev
    # The state is a snapshot: continuing the original did not change it.
    fresh2 = cls(torch.zeros(6), 1.0, seed=5)
    fresh2.load_state_dict(state)
    assert torch.equal(run(fresh2, 1)[0], rest[0])


@pytest.mark.parametrize("cls", SEARCHERS, ids=ids)
def test_nonfinite_fitness(cls):
    es = cls(torch.ones(4), 0.5, seed=0)
    x = es.ask()
    f = F.sphere(x)
    f[1] = float("nan")
    state = es.state_dict()
    with pytest.raises(gk.NonFiniteError):
        es.tell(x, f)
    assert es.generation == 0 and es.nfev == 0 and torch.equal(es.state_dict()["rng_state"], state["rng_state"])

    skip = cls(torch.ones(4), 0.5, seed=0, on_nonfinite="skip")
    x = skip.ask()
    before = {k: v.clone() for k, v in skip.state_dict().items() if isinstance(v, torch.Tensor)}
    skip.tell(x, torch.full((skip.popsize,), float("inf")))
    after = skip.state_dict()
    assert skip.n_skipped == 1 and skip.generation == 0
    assert all(torch.equal(before[k], after[k]) for k in before if k != "rng_state")

    worst = cls(torch.ones(4), 0.5, seed=0, on_nonfinite="worst")
    x = worst.ask()
    f = F.sphere(x)
    i = int(f.argmin())
    f[i] = float("nan")
    worst.tell(x, f)
    assert worst.generation == 1 and math.isfinite(worst.best[1]) and worst.best[1] > float(F.sphere(x[i]))


@pytest.mark.parametrize("cls", SEARCHERS, ids=ids)
def test_bad_input_names_the_argument(cls):
    with pytest.raises(ValueError, match="sigma0"):
        cls(torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="sigma0"):
        cls(torch.zeros(3), -1.0)
    with pytest.raises(ValueError, match="x0"):
        cls(torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="popsize"):
        cls(torch.zeros(3), 1.0, popsize=1)
    with pytest.raises(ValueError, match="on_nonfinite"):
        cls(torch.zeros(3), 1.0, on_nonfinite="nope")
    with pytest.raises(ValueError, match="bounds"):
        cls(torch.zeros(3), 1.0, bounds=(1.0, -1.0))
    es = cls(torch.zeros(3), 1.0, seed=0)
    x = es.ask()
    with pytest.raises(ValueError, match="candidates"):
        es.tell(x[:, :2], torch.zeros(es.popsize))
    with pytest.raises(ValueError, match="candidates"):
        es.tell(x[:-2], torch.zeros(es.popsize - 2))
    with pytest.raises(ValueError, match="fitness"):
        es.tell(x, torch.zeros(es.popsize + 1))
    with pytest.raises(ValueError, match="fitness"):
        es.tell(x, torch.zeros(es.popsize, 2))
    assert es.generation == 0


@pytest.mark.parametrize("cls", SEARCHERS, ids=ids)
def test_bounds_are_respected(cls):
    lo, hi = torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([1.0, 0.5, 3.0])
    es = cls(torch.tensor([0.0, 0.25, 2.5]), 2.0, bounds=(lo, hi), seed=0)
    for _ in range(5):
        x = es.ask()
        assert bool((x >= lo).all() and (x <= hi).all())
        # the optimum of this sphere is outside the box: the search must end on its boundary
        es.tell(x, F.sphere(x - 10))
    assert bool((es.mean >= lo - 1e-12).all() and (es.mean <= hi + 1e-12).all())
