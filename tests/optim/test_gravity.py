import pytest
import torch
from pytorch_optimizer import Gravity as RefGravity

import gradkit as gk
from tests.helpers import assert_parity, assert_state_dict_roundtrip, make_params, two_groups


def _seeded(factory):
    # With seed=None, v is initialised from torch's global generator at the first step, as in the reference.
    def make(ps):
        torch.manual_seed(1234)
        return factory(ps)

    return make


def test_gravity_parity_with_pytorch_optimizer(kernel):
    kw = dict(lr=1e-2, alpha=0.02, beta=0.9)
    ours = _seeded(lambda ps: gk.optim.Gravity(two_groups(ps, lr=3e-3, beta=0.8), **kw, seed=None, kernel=kernel))
    ref = _seeded(lambda ps: RefGravity(two_groups(ps, lr=3e-3, beta=0.8), **kw, foreach=False))
    assert_parity(ours, ref, atol=2e-5)


def test_gravity_damps_large_gradient_entries():
    # ζ = g/(1 + (g·max|g|)²): the largest entry is damped most; with β=0 and v₀≈0 one step moves by lr·ζ.
    p = torch.zeros(3, requires_grad=True)
    opt = gk.optim.Gravity([p], lr=1.0, alpha=1e-12, beta=0.0, kernel="loop")
    g = torch.tensor([0.1, 1.0, 2.0])
    p.grad = g.clone()
    opt.step()
    beta_t = (0.0 * 1 + 1) / (1 + 2)  # β_t at t=1 with β=0
    expected = -(1 - beta_t) * g / (1 + (g * 2.0) ** 2)
    torch.testing.assert_close(p.detach(), expected, atol=1e-9, rtol=1e-5)


def test_gravity_seeded_velocity_ignores_global_rng():
    def run(global_seed, seed):
        torch.manual_seed(global_seed)
        ps = make_params()
        opt = gk.optim.Gravity(ps, seed=seed, kernel="foreach")
        for p in ps:
            p.grad = torch.zeros_like(p)  # ζ = 0: after one step v = β₁·v₀ with β₁ = (0.9 + 1)/3
        opt.step()
        return [opt.state[p]["v"] / ((0.9 + 1) / 3) for p in ps]

    same = run(1, 5), run(2, 5)
    assert all(torch.equal(a, b) for a, b in zip(*same))
    assert not torch.equal(run(1, 5)[0], run(1, 6)[0])
    v = torch.cat([x.flatten() for x in run(1, 5)])
    # The velocity starts near N(0, (α/lr)²) = N(0, 1): mean within 5 standard errors of 0 over ~800 draws.
    assert abs(float(v.mean())) < 5 / v.numel() ** 0.5 and 0.8 < float(v.std()) < 1.2


def test_gravity_state_dict_roundtrip(kernel):
    assert_state_dict_roundtrip(_seeded(lambda ps: gk.optim.Gravity(two_groups(ps, lr=3e-3), kernel=kernel)))


@pytest.mark.parametrize("arg,value", [("lr", 0.0), ("alpha", 1.5), ("beta", -0.1), ("seed", -1)])
def test_gravity_bad_input_names_argument(arg, value):
    with pytest.raises(ValueError, match=arg):
        gk.optim.Gravity(make_params(), **{arg: value}, kernel="foreach")
