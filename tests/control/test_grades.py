import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradkit as gk


class TwoLayer(nn.Module):
    """``big`` drives the loss; ``small``'s contribution is scaled by ``k``, so its gradient is ~k times smaller."""

    def __init__(self, k: float = 1e-4):
        super().__init__()
        torch.manual_seed(0)
        self.big = nn.Linear(6, 4)
        self.small = nn.Linear(6, 4)
        self.k = k

    def forward(self, x):
        return self.big(x) + self.k * self.small(x)


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(64, 6, generator=gen), torch.randn(64, 4, generator=gen)


def train(model, grades, opt, steps, pipeline=True, create_graph=False):
    x, y = data()
    if pipeline:
        pipe = gk.Pipeline(gk.sources.Backprop(model, create_graph=create_graph), [], opt, [grades])
        for _ in range(steps):
            pipe.step(lambda: F.mse_loss(model(x), y))
            if pipe.should_stop:
                break
        return pipe
    for _ in range(steps):  # a plain PyTorch loop works too
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        grades.after_step(0.0)
    return None


def l1(model, name):
    x, y = data()
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    return float(dict(model.named_parameters())[name].grad.abs().sum())


def test_freezes_only_the_converged_matrix_after_warmup_and_patience():
    model = TwoLayer()
    tau = 100 * l1(model, "small.weight")  # far above small's statistic, far below big's
    assert l1(model, "big.weight") > 10 * tau
    model.zero_grad(set_to_none=True)
    g = gk.control.GradES(model, tau=tau, patience=3, warmup_steps=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    train(model, g, opt, 7)
    assert not g.frozen  # warm-up 5 + patience 3 = step 8
    train(model, g, opt, 1)
    assert list(g.frozen) == ["small.weight"] and g.frozen["small.weight"] == 8
    assert not model.small.weight.requires_grad and model.small.weight.grad is None
    assert model.small.bias.requires_grad  # targets="matrices": vectors keep training
    assert g.frozen_fraction == pytest.approx(24 / 48)
    assert not g.should_stop


def test_frozen_matrix_is_never_modified_again_plain_loop():
    model = TwoLayer()
    g = gk.control.GradES(model, tau=1e9, patience=2, targets=["small.weight"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    train(model, g, opt, 2, pipeline=False)
    assert "small.weight" in g.frozen
    frozen = model.small.weight.detach().clone()
    big = model.big.weight.detach().clone()
    train(model, g, opt, 20, pipeline=False)
    assert torch.equal(model.small.weight, frozen)
    assert not torch.equal(model.big.weight, big)


def _optimizers():
    return list(gk.optim.available().values())


@pytest.mark.parametrize("cls", _optimizers(), ids=lambda c: c.__name__)
def test_frozen_matrix_untouched_by_every_gradkit_optimizer(cls):
    kw = {"kernel": "foreach"}
    if "weight_decay" in inspect.signature(cls).parameters:
        kw["weight_decay"] = 0.1  # decay must not reach a frozen matrix either
    # Second-order optimizers (AdaHessian) need the gradient's graph: retry with create_graph=True.
    for create_graph in (False, True):
        model = TwoLayer()
        opt = cls(model.parameters(), **kw)
        g = gk.control.GradES(model, tau=1e9, patience=3, targets=["small.weight"], optimizer=opt)
        try:
            train(model, g, opt, 3, create_graph=create_graph)
            break
        except Exception as exc:
            error = exc
    else:
        pytest.skip(f"{cls.__name__} does not run in a Backprop pipeline: {error}")
    assert "small.weight" in g.frozen
    assert model.small.weight not in opt.state  # its state was dropped
    frozen = model.small.weight.detach().clone()
    before = model.big.weight.detach().clone()
    train(model, g, opt, 10, create_graph=create_graph)
    assert torch.equal(model.small.weight, frozen)
    assert not torch.equal(model.big.weight, before)  # the optimizer is really stepping
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # a checkpoint without the frozen state loads


def test_spike_resets_patience():
    model = TwoLayer()
    g = gk.control.GradES(model, tau=1.0, patience=3, targets=["small.weight"], observe="transform")
    p = model.small.weight
    for v in [0.1, 0.1, 5.0, 0.1, 0.1]:
        p.grad = torch.full_like(p, v / p.numel())  # L1 norm = v
        g()
        g.after_step(0.0)
    assert not g.frozen
    p.grad = torch.full_like(p, 0.1 / p.numel())
    g()
    g.after_step(0.0)
    assert "small.weight" in g.frozen and g.frozen["small.weight"] == 6


def test_smoothing_averages_the_statistic_before_the_threshold():
    model = TwoLayer()
    g = gk.control.GradES(model, tau=1.0, patience=1, targets=["small.weight"], observe="transform", smoothing=0.5)
    p = model.small.weight
    for v, expected in [(4.0, 4.0), (0.0, 2.0), (0.0, 1.0), (0.0, 0.5)]:
        p.grad = torch.full_like(p, v / p.numel())
        g()
        g.after_step(0.0)
        assert g.last.get("small.weight", 0.5) == pytest.approx(expected)
        assert ("small.weight" in g.frozen) == (expected < 1.0)


def test_hook_and_transform_observation_agree():
    m1, m2 = TwoLayer(), TwoLayer()
    g1 = gk.control.GradES(m1, tau=1e-12, statistic="mean_abs")
    g2 = gk.control.GradES(m2, tau=1e-12, statistic="mean_abs", observe="transform")
    x, y = data()
    for m in (m1, m2):
        F.mse_loss(m(x), y).backward()
    g2(m2.parameters())
    g1.after_step(0.0)
    g2.after_step(0.0)
    assert g1.last.keys() == g2.last.keys() == {"big.weight", "small.weight"}
    for k in g1.last:
        assert g1.last[k] == pytest.approx(g2.last[k], rel=1e-6)
    expected = float(m1.big.weight.grad.abs().mean())
    assert g1.last["big.weight"] == pytest.approx(expected, rel=1e-6)


def test_stops_when_everything_is_frozen():
    model = TwoLayer()
    g = gk.control.GradES(model, tau=1e9, patience=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pipe = train(model, g, opt, 100)
    assert pipe.should_stop and pipe.steps == 4 and g.frozen_fraction == 1.0


def test_zeroth_order_source_with_observe_transform():
    model = TwoLayer()
    x, y = data()
    g = gk.control.GradES(model, tau=1e9, patience=2, observe="transform")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pipe = gk.Pipeline(gk.sources.SPSA(model, seed=0), [g], opt, [g])
    for _ in range(5):
        pipe.step(lambda: F.mse_loss(model(x), y))
        if pipe.should_stop:
            break
    assert pipe.steps == 2 and g.frozen_fraction == 1.0
    # Without observe="transform" the hooks never fire under a zeroth-order source: a clear error, not silence.
    m2 = TwoLayer()
    g2 = gk.control.GradES(m2, tau=1.0)
    before = [p.detach().clone() for p in m2.parameters()]
    with pytest.raises(ValueError, match="observe='transform'"):  # at construction, before anything moved
        gk.Pipeline(gk.sources.SPSA(m2, seed=0), [], torch.optim.SGD(m2.parameters(), lr=0.01), [g2])
    assert all(torch.equal(a, b) for a, b in zip(before, m2.parameters()))
    # observe='transform' but not among the transforms: the statistic would never be recorded.
    g3 = gk.control.GradES(m2, tau=1.0, observe="transform")
    with pytest.raises(ValueError, match="add the same object to the Pipeline's transforms"):
        gk.Pipeline(gk.sources.SPSA(m2, seed=0), [], torch.optim.SGD(m2.parameters(), lr=0.01), [g3])


def test_missing_gradients_are_reported():
    model = TwoLayer()
    g = gk.control.GradES(model, tau=1.0)
    with pytest.raises(RuntimeError, match="observe='transform'"):
        g.after_step(0.0)


def test_state_dict_roundtrip_restores_frozen_set():
    model = TwoLayer()
    g = gk.control.GradES(model, tau=1e9, patience=2, targets=["small.weight"], warmup_steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, g, opt, 3)
    saved = copy.deepcopy(g.state_dict())
    clone = TwoLayer()
    g2 = gk.control.GradES(clone, tau=1e9, patience=2, targets=["small.weight"], warmup_steps=1)
    g2.load_state_dict(saved)
    assert g2.state_dict() == saved
    assert not clone.small.weight.requires_grad and clone.big.weight.requires_grad


@pytest.mark.parametrize("name,kw", [("tau", dict(tau=0.0)), ("tau", dict(tau=-1.0)),
                                     ("patience", dict(tau=1.0, patience=0)),
                                     ("warmup_steps", dict(tau=1.0, warmup_steps=-1)),
                                     ("statistic", dict(tau=1.0, statistic="l2")),
                                     ("smoothing", dict(tau=1.0, smoothing=1.0)),
                                     ("targets", dict(tau=1.0, targets=["nope.weight"])),
                                     ("targets", dict(tau=1.0, targets="layers"))])
def test_bad_input(name, kw):
    with pytest.raises(ValueError, match=name):
        gk.control.GradES(TwoLayer(), **kw)
