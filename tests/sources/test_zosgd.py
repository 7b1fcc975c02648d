"""ZOSGD, the fused zeroth-order mode: the SPSA estimate and the SGD update without a gradient buffer."""

import copy

import pytest
import torch
import torch.nn.functional as F

import gradkit as gk
from gradkit.models import mlp


def _problem():
    model = mlp((6, 8, 3), seed=0).double()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen)
    return model, (lambda m: (lambda: F.cross_entropy(m(x), y)))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_update_equals_spsa_then_sgd(weight_decay):
    model, make = _problem()
    twin = copy.deepcopy(model)
    zo = gk.sources.ZOSGD(model, lr=0.1, eps=1e-3, n_directions=3, weight_decay=weight_decay, seed=4)
    spsa = gk.sources.SPSA(twin, eps=1e-3, n_directions=3, seed=4)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(10):
        la = zo.step(make(model))
        lb = spsa.estimate(make(twin))
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(1 - 0.1 * weight_decay)
        sgd.step()
        sgd.zero_grad()
        assert float(la) == pytest.approx(float(lb), rel=1e-9)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # never a gradient buffer


def test_in_a_pipeline_as_source_and_optimizer_and_with_a_scheduler():
    model, make = _problem()
    zo = gk.sources.ZOSGD(model, lr=0.2, eps=1e-3, n_directions=4, seed=0)
    pipe = gk.Pipeline(zo, optimizer=zo)
    sched = torch.optim.lr_scheduler.StepLR(zo, step_size=100, gamma=0.5)
    first = float(make(model)().detach())
    for _ in range(200):
        pipe.step(make(model))
        sched.step()
    assert float(make(model)().detach()) < 0.8 * first
    assert zo.param_groups[0]["lr"] == pytest.approx(0.05)
    assert zo.step_count == 200 and pipe.steps == 200


def test_step_without_closure_is_only_valid_after_estimate():
    model, make = _problem()
    zo = gk.sources.ZOSGD(model, seed=0)
    with pytest.raises(ValueError, match="closure"):
        zo.step()
    zo.estimate(make(model))
    before = [p.detach().clone() for p in model.parameters()]
    assert zo.step() is None  # the Pipeline's optimizer.step(): the update already happened
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="closure"):
        zo.step()
    with pytest.raises(ValueError, match="parameter groups"):
        zo.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    with pytest.raises(ValueError, match="fused|ZOSGD"):
        gk.sources.compare(zo, make(model), n=2)


def test_state_dict_round_trip_continues_identically():
    model, make = _problem()
    zo = gk.sources.ZOSGD(model, lr=0.05, seed=2)
    for _ in range(3):
        zo.step(make(model))
    saved, weights = copy.deepcopy(zo.state_dict()), copy.deepcopy(model.state_dict())
    for _ in range(3):
        zo.step(make(model))
    other, _ = _problem()
    other.load_state_dict(weights)
    zo2 = gk.sources.ZOSGD(other, lr=1.0, seed=99)
    zo2.load_state_dict(saved)
    assert zo2.param_groups[0]["lr"] == 0.05
    for _ in range(3):
        zo2.step(make(other))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
