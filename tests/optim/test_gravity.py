import pytest
import torch
from pytorch_optimizer import Gravity as RefGravity

import gradkit as gk
from tests.helpers import assert_parity, assert_state_dict_roundtrip, make_params, two_groups


def _seeded(factory):
    # v is initialised from torch's global generator at the first step, as in the reference: seed both alike.
    def make(ps):
        torch.manual_seed(1234)
        return factory(ps)

    return make


def test_gravity_parity_with_pytorch_optimizer(kernel):
    kw = dict(lr=1e-2, alpha=0.02, beta=0.9)
    ours = _seeded(lambda ps: gk.optim.Gravity(two_groups(ps, lr=3e-3, beta=0.8), **kw, kernel=kernel))
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


def test_gravity_state_dict_roundtrip(kernel):
    assert_state_dict_roundtrip(_seeded(lambda ps: gk.optim.Gravity(two_groups(ps, lr=3e-3), kernel=kernel)))


@pytest.mark.parametrize("arg,value", [("lr", 0.0), ("alpha", 1.5), ("beta", -0.1)])
def test_gravity_bad_input_names_argument(arg, value):
    with pytest.raises(ValueError, match=arg):
        gk.optim.Gravity(make_params(), **{arg: value}, kernel="foreach")
