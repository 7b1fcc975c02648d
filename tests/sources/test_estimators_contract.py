"""Contract of the estimated-gradient sources: exact restoration, seeding, state_dict, bad input, non-finite."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradkit as gk
from gradkit.models import mlp
from gradkit.search.shaping import centred_ranks
from gradkit.sources._perturb import Perturbation, stream_seed

# name -> (factory(model, seed), closure evaluations per estimate)
FACTORIES = {
    "ForwardGradient": (lambda m, s: gk.sources.ForwardGradient(m, n_directions=2, seed=s), 2),
    "SPSA": (lambda m, s: gk.sources.SPSA(m, eps=1e-3, n_directions=2, seed=s), 4),
    "SPSA-rademacher": (lambda m, s: gk.sources.SPSA(m, eps=1e-3, n_directions=2, seed=s,
                                                     distribution="rademacher"), 4),
    "ES": (lambda m, s: gk.sources.ES(m, sigma=0.05, population=4, seed=s), 4),
    "ES-raw": (lambda m, s: gk.sources.ES(m, sigma=0.05, population=3, antithetic=False, rank_shaping=False,
                                          seed=s), 3),
    "LikelihoodRatio": (lambda m, s: gk.sources.LikelihoodRatio(m, sigma=0.1, n_samples=4, seed=s), 4),
    "ZOSGD": (lambda m, s: gk.sources.ZOSGD(m, lr=0.05, eps=1e-3, n_directions=2, seed=s), 4),
}
PERTURBING = ["SPSA", "SPSA-rademacher", "ES", "ES-raw", "ZOSGD"]


def _problem(seed=0):
    model = mlp((6, 8, 3), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    return model, x, y


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _pipe(src, model):
    opt = src if isinstance(src, torch.optim.Optimizer) else gk.optim.AdamW(model.parameters(), lr=1e-2,
                                                                            kernel="foreach")
    return gk.Pipeline(src, optimizer=opt)


def test_restoration_is_exact_where_naive_round_trips_are_not():
    gen = torch.Generator().manual_seed(0)
    # Magnitudes from 1e-9 to 1e4, zeros, a NaN and an Inf: p + d - d loses bits for many of them.
    p = (torch.randn(4000, generator=gen) * 10 ** torch.randint(-9, 5, (4000,), generator=gen).float())
    p[:5] = 0.0
    p[5], p[6] = float("nan"), float("inf")
    p.requires_grad_()
    orig = p.detach().clone()
    # Chunks of 1000 elements: the 4000-element parameter is shifted and restored in 4 pieces; a transposed
    # (non-contiguous) parameter takes the whole-tensor path.
    q = (torch.randn(30, 20, generator=gen) * 1e-4).t().detach().requires_grad_()
    q_orig = q.detach().clone()
    assert not q.is_contiguous()
    pert = Perturbation([p, q], seed=3, chunk=1000)
    d = pert.direction(0, 0, 0).mul_(0.5)
    naive = (orig + d) - d
    assert not torch.equal(naive, orig) and int((naive != orig).sum()) > 10  # the problem is real
    with pert.shifted(0, 0, 0.5):
        assert not torch.equal(p.detach(), orig)
    # Bit for bit, NaN payload included.
    assert torch.equal(p.detach().view(torch.int32), orig.view(torch.int32))
    assert torch.equal(q.detach(), q_orig)
    # The fused update and .grad use the same chunked directions.
    pert.combine(0, [0, 1], [0.5, -2.0])
    want = 0.5 * pert.direction(0, 0, 0) - 2.0 * pert.direction(0, 0, 1)
    torch.testing.assert_close(p.grad, want)
    with torch.no_grad():
        before = q.detach().clone()
        pert.apply(0, [0], [2.0], 0.25)
        torch.testing.assert_close(q, before + 0.5 * pert.direction(1, 0, 0))
        q.copy_(q_orig)
        p.copy_(orig)
    # Repeated shifts never drift.
    for k in range(20):
        with pert.shifted(1, k, 1e-3 * (k + 1)):
            pass
    assert torch.equal(p.detach().view(torch.int32), orig.view(torch.int32))


def test_directions_are_regenerated_not_stored_and_leave_the_global_rng_alone():
    p = torch.zeros(3, 4, requires_grad=True)
    pert = Perturbation([p], seed=9)
    state = torch.random.get_rng_state()
    a, b = pert.direction(0, 5, 2), pert.direction(0, 5, 2)
    assert torch.equal(a, b) and not torch.equal(a, pert.direction(0, 5, 3))
    assert not torch.equal(a, pert.direction(0, 6, 2))
    assert torch.equal(torch.random.get_rng_state(), state)
    rad = Perturbation([p], seed=9, distribution="rademacher").direction(0, 0, 0)
    assert set(rad.unique().tolist()) <= {-1.0, 1.0}
    assert stream_seed(1, 2) != stream_seed(2, 1)
    assert torch.equal(centred_ranks(torch.tensor([3.0, 1.0, 2.0])), torch.tensor([0.5, -0.5, 0.0]))


@pytest.mark.parametrize("name", PERTURBING)
def test_parameters_restored_bit_exactly_when_the_closure_raises_at_any_evaluation(name):
    factory, evals = FACTORIES[name]
    for fail_at in range(evals):
        model, x, y = _problem()
        before = _params(model)
        src = factory(model, 0)
        state = copy.deepcopy(src.state_dict())
        calls = [0]

        def closure():
            calls[0] += 1
            if calls[0] == fail_at + 1:
                raise RuntimeError("boom")
            return F.cross_entropy(model(x), y)

        with pytest.raises(RuntimeError, match="boom"):
            src.estimate(closure)
        assert _same(before, _params(model)), f"parameters moved after a failure at evaluation {fail_at}"
        assert all(p.grad is None for p in model.parameters())
        assert src.state_dict() == state


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_nonfinite_loss_at_any_evaluation_raises_with_parameters_unperturbed(name):
    factory, evals = FACTORIES[name]
    for bad_at in range(evals):
        model, x, y = _problem()
        before = _params(model)
        src = factory(model, 0)
        calls = [0]

        def closure():
            calls[0] += 1
            loss = F.cross_entropy(model(x), y)
            return loss * float("nan") if calls[0] == bad_at + 1 else loss

        with pytest.raises(gk.NonFiniteError):
            src.estimate(closure)
        assert _same(before, _params(model))
        assert all(type(p) is nn.Parameter for p in model.parameters())


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_general_mode_sources_leave_parameters_bit_exact_and_write_every_grad(name):
    if name == "ZOSGD":
        pytest.skip("ZOSGD is the fused mode: it moves the parameters (tested in test_zosgd.py)")
    factory, _ = FACTORIES[name]
    model, x, y = _problem()
    before = _params(model)
    loss = factory(model, 0).estimate(lambda: F.cross_entropy(model(x), y))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert _same(before, _params(model))
    assert all(p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all()
               for p in model.parameters())
    assert not all(float(p.grad.abs().sum()) == 0 for p in model.parameters())


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_same_seed_same_parameters_and_state_dict_round_trip(name):
    factory, _ = FACTORIES[name]

    def train(steps, seed, model=None, x=None, y=None, state=None):
        if model is None:
            model, x, y = _problem()
        src = factory(model, seed)
        pipe = _pipe(src, model)
        if state is not None:
            pipe.load_state_dict(copy.deepcopy(state))
        for _ in range(steps):
            pipe.step(lambda: F.cross_entropy(model(x), y))
        return model, pipe, x, y

    a, *_ = train(6, 0)
    b, *_ = train(6, 0)
    c, *_ = train(6, 1)
    assert _same(_params(a), _params(b))
    assert not _same(_params(a), _params(c))
    half, pipe, x, y = train(3, 0)
    saved, weights = copy.deepcopy(pipe.state_dict()), copy.deepcopy(half.state_dict())
    fresh, _, _ = _problem()
    fresh.load_state_dict(weights)
    resumed, *_ = train(3, 0, fresh, x, y, state=saved)
    assert _same(_params(a), _params(resumed))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_pipeline_skip_changes_nothing_and_the_run_continues_identically(name):
    factory, _ = FACTORIES[name]
    runs = []
    for inject in (False, True):
        model, x, y = _problem()
        pipe = _pipe(factory(model, 0), model)
        pipe.on_nonfinite = "skip"
        for step in range(4):
            if inject and step == 2:
                pipe.step(lambda: F.cross_entropy(model(x), y) * float("inf"))
            pipe.step(lambda: F.cross_entropy(model(x), y))
        runs.append(_params(model))
        if inject:
            assert pipe.skipped == 1
    assert _same(*runs)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_bad_closures_raise_value_error(name):
    factory, _ = FACTORIES[name]
    model, x, y = _problem()
    before = _params(model)
    src = factory(model, 0)
    with pytest.raises(ValueError, match="scalar"):
        src.estimate(lambda: F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(ValueError, match="scalar"):
        src.estimate(lambda: 1.0)
    assert _same(before, _params(model))


def test_forward_gradient_needs_a_loss_that_depends_on_the_parameters():
    model, x, y = _problem()
    src = gk.sources.ForwardGradient(model, seed=0)
    with pytest.raises(ValueError, match="does not depend"):
        src.estimate(lambda: (x**2).mean())
    with pytest.raises(ValueError, match="nn.Module"):
        gk.sources.ForwardGradient(list(model.parameters()))
    with pytest.raises(ValueError, match="guess"):
        gk.sources.ForwardGradient(model, guess=lambda: [torch.zeros(1)]).estimate(
            lambda: F.cross_entropy(model(x), y))
    assert all(type(p) is nn.Parameter for p in model.parameters())


def test_bad_arguments_name_the_argument():
    model, *_ = _problem()
    cases = [
        (lambda: gk.sources.SPSA(model, eps=0.0), "eps"),
        (lambda: gk.sources.SPSA(model, n_directions=0), "n_directions"),
        (lambda: gk.sources.SPSA(model, distribution="uniform"), "distribution"),
        (lambda: gk.sources.SPSA(model, seed=-1), "seed"),
        (lambda: gk.sources.ZOSGD(model, lr=-1.0), "lr"),
        (lambda: gk.sources.ZOSGD(model, weight_decay=-1.0), "weight_decay"),
        (lambda: gk.sources.ES(model, sigma=0.0), "sigma"),
        (lambda: gk.sources.ES(model, population=5), "population"),
        (lambda: gk.sources.ForwardGradient(model, n_directions=0), "n_directions"),
        (lambda: gk.sources.ForwardGradient(model, guess=3), "guess"),
        (lambda: gk.sources.LikelihoodRatio(model, sigma=-1.0), "sigma"),
        (lambda: gk.sources.LikelihoodRatio(model, n_samples=3), "n_samples"),
    ]
    for make, name in cases:
        with pytest.raises(ValueError, match=name):
            make()


def test_likelihood_ratio_names_unsupported_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"1\.weight \(in LayerNorm\)"):
        gk.sources.LikelihoodRatio(model)
    model[1].requires_grad_(False)  # frozen: fine
    gk.sources.LikelihoodRatio(model)
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="Embedding"):
        gk.sources.LikelihoodRatio(emb)


def test_frozen_parameters_are_neither_perturbed_nor_given_a_gradient():
    for name in sorted(FACTORIES):
        factory, _ = FACTORIES[name]
        model, x, y = _problem()
        model[0].weight.requires_grad_(False)
        frozen = model[0].weight.detach().clone()
        src = factory(model, 0)
        model[0].bias.requires_grad_(False)  # frozen after construction (as a controller would)
        bias = model[0].bias.detach().clone()
        src.estimate(lambda: F.cross_entropy(model(x), y))
        assert torch.equal(model[0].weight, frozen) and torch.equal(model[0].bias, bias), name
        assert model[0].weight.grad is None and model[0].bias.grad is None, name


@pytest.mark.parametrize("fail_on_chunk", [0, 1, 3, 5])
def test_an_interruption_midway_through_shifting_still_restores_exactly(fail_on_chunk):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(n, generator=gen).mul_(1e-3).requires_grad_() for n in (250, 100, 300)]
    orig = [p.detach().clone() for p in params]
    pert = Perturbation(params, seed=0, chunk=100)
    real = pert._chunks
    count = [0]

    def flaky(i, step, k):
        for item in real(i, step, k):
            if count[0] == fail_on_chunk:
                count[0] += 1
                raise RuntimeError("interrupted")
            count[0] += 1
            yield item

    pert._chunks = flaky
    with pytest.raises(RuntimeError, match="interrupted"):
        with pert.shifted(0, 0, 0.7):
            pass
    assert all(torch.equal(a, b) for a, b in zip(orig, params))


def test_exact_restore_false_drifts_by_at_most_rounding_and_exact_does_not():
    model, x, y = _problem()
    with torch.no_grad():
        model[0].weight.mul_(1e-3)  # tiny weights: many inexact round trips
    before = _params(model)
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    loose = gk.sources.SPSA(model, eps=1e-2, n_directions=4, seed=0, exact_restore=False)
    loose.estimate(closure)
    after = _params(model)
    assert not _same(before, after)  # the drift is real ...
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)  # ... and only rounding
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    gk.sources.SPSA(model, eps=1e-2, n_directions=4, seed=0).estimate(closure)
    assert _same(before, _params(model))
