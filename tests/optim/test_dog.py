import copy

import dog
import pytest
import torch

import gradkit as gk
from tests.helpers import assert_parity, assert_state_dict_roundtrip, make_params, two_groups

CLASSES = {"DoG": (gk.optim.DoG, dog.DoG), "LDoG": (gk.optim.LDoG, dog.LDoG)}


@pytest.mark.parametrize("name", ["DoG", "LDoG"])
def test_parity_with_dog_optimizer(kernel, name):
    ours_cls, ref_cls = CLASSES[name]
    # reps_rel 1e-4 (the authors' value with batch norm) makes the 200 steps travel far enough to matter.
    kw = dict(reps_rel=1e-4, weight_decay=0.1)
    assert_parity(lambda ps: ours_cls(two_groups(ps, weight_decay=0.3), **kw, kernel=kernel),
                  lambda ps: ref_cls(two_groups(ps, weight_decay=0.3), **kw))


@pytest.mark.parametrize("kernel_", ["loop", "foreach"])
@pytest.mark.parametrize("name", ["DoG", "LDoG"])
def test_parity_with_init_eta_and_lr(kernel_, name):
    ours_cls, ref_cls = CLASSES[name]
    kw = dict(init_eta=1e-3, lr=0.8, eps=1e-6)
    assert_parity(lambda ps: ours_cls(two_groups(ps, lr=0.8, reps_rel=1e-3), **kw, kernel=kernel_),
                  lambda ps: ref_cls(two_groups(ps, lr=0.8, reps_rel=1e-3), **kw))


@pytest.mark.parametrize("name", ["DoG", "LDoG"])
def test_state_dict_roundtrip(kernel, name):
    cls = CLASSES[name][0]
    assert_state_dict_roundtrip(lambda ps: cls(two_groups(ps, weight_decay=0.2), reps_rel=1e-4, kernel=kernel))


def test_step_size_is_distance_over_root_gradient_sum():
    # The defining rule, checked from the outside: η_t = max(r_ε, max_i ‖x_i − x_0‖) / sqrt(Σ‖g_i‖² + ε).
    torch.manual_seed(0)
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    x0 = x.detach().clone()
    opt = gk.optim.DoG([x], reps_rel=1e-2, kernel="loop")
    rbar, gsum = 1e-2 * (1 + float(x0.norm())), 1e-8
    for _ in range(20):
        rbar = max(rbar, float((x.detach() - x0).norm()))
        g = torch.randn(50, dtype=torch.float64) + 1.0
        gsum += float(g.square().sum())
        before = x.detach().clone()
        x.grad = g
        opt.step()
        torch.testing.assert_close(before - x.detach(), g * (rbar / gsum**0.5), atol=1e-13, rtol=1e-12)


def test_ldog_step_sizes_are_per_tensor():
    a, b = torch.zeros(10, requires_grad=True), torch.zeros(10, requires_grad=True)
    opt = gk.optim.LDoG([a, b], init_eta=None, kernel="foreach")
    for _ in range(3):
        a.grad, b.grad = torch.ones(10), 100 * torch.ones(10)
        opt.step()
    # Same direction, gradients 100x apart: L-DoG's per-tensor normalisation makes both tensors move alike.
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=0)
    assert opt.state[a]["eta"] != opt.state[b]["eta"]


@pytest.mark.parametrize("bad, name", [
    (dict(reps_rel=0.0), "reps_rel"), (dict(reps_rel=-1e-6), "reps_rel"), (dict(init_eta=0.0), "init_eta"),
    (dict(eps=0.0), "eps"), (dict(weight_decay=-1.0), "weight_decay"), (dict(lr=-1.0), "lr"),
])
@pytest.mark.parametrize("cls", [gk.optim.DoG, gk.optim.LDoG])
def test_bad_input_names_argument(cls, bad, name):
    with pytest.raises(ValueError, match=name):
        cls(make_params(), **bad)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))


def test_polynomial_decay_averager_matches_reference():
    model = _model()
    ours = gk.optim.PolynomialDecayAverager(model, gamma=8.0)
    ref = dog.PolynomialDecayAverager(model, gamma=8.0)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        loss = model(torch.randn(16, 6, generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ours.step()
        ref.step()
    a, b = ours.averaged_model.state_dict(), ref.averaged_model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert float((a["0.weight"] - model.state_dict()["0.weight"]).abs().max()) > 1e-3  # an average, not a copy


def test_polynomial_decay_averager_state_dict_and_bad_gamma():
    model = _model()
    av = gk.optim.PolynomialDecayAverager(model)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        av.step()
    saved = copy.deepcopy(av.state_dict())
    other = gk.optim.PolynomialDecayAverager(model)
    other.load_state_dict(saved)
    assert other.t == av.t == 4
    for k, v in av.averaged_model.state_dict().items():
        assert torch.equal(v, other.averaged_model.state_dict()[k])
    with pytest.raises(ValueError, match="gamma"):
        gk.optim.PolynomialDecayAverager(model, gamma=-1.0)

