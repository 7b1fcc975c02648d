import pytest
import torch
from pytorch_optimizer import MARS as RefMARS

import gradkit as gk
from tests.helpers import assert_parity, assert_state_dict_roundtrip, make_params, run_sequence, two_groups


@pytest.mark.parametrize("mars_type,optimize_1d", [("adamw", False), ("lion", True)])
def test_mars_parity_with_pytorch_optimizer(kernel, mars_type, optimize_1d):
    _parity(kernel, mars_type, optimize_1d)


@pytest.mark.parametrize("mars_type,optimize_1d", [("adamw", True), ("lion", False)])
def test_mars_parity_other_forms_foreach(mars_type, optimize_1d):
    _parity("foreach", mars_type, optimize_1d)


def _parity(kernel, mars_type, optimize_1d):
    lr = 1e-2 if mars_type == "adamw" else 1e-3
    kw = dict(lr=lr, betas=(0.9, 0.99), gamma=0.05, mars_type=mars_type, optimize_1d=optimize_1d, lr_1d=5e-3,
              weight_decay=0.05, weight_decay_1d=0.02)
    groups = dict(lr=lr / 4, weight_decay=0.2)

    def ours(ps):
        return gk.optim.MARS(two_groups(ps, **groups), **kw, kernel=kernel)

    def ref(ps):
        return RefMARS(two_groups(ps, **groups), **kw, foreach=False)

    # scale=3: correction norms exceed 1 on the larger tensors, so the per-tensor clipping is exercised too.
    assert_parity(ours, ref, scale=3.0, atol=2e-5)


def test_mars_clipping_engages():
    # c = g·(1 + γ·β1/(1−β1)) has norm ≫ 1 here, so the first momentum is (1−β1)·c/‖c‖, not (1−β1)·c.
    p = torch.zeros(8, 8, requires_grad=True)
    opt = gk.optim.MARS([p], lr=0.1, kernel="loop")
    p.grad = torch.full((8, 8), 10.0)
    opt.step()
    c = torch.full((8, 8), 10.0) * (1 + 0.025 * 0.95 / 0.05)
    expected_m = (1 - 0.95) * c / c.norm()
    torch.testing.assert_close(opt.state[p]["exp_avg"], expected_m)
    assert torch.equal(opt.state[p]["last_grad"], p.grad)


def test_mars_1d_parameters_use_adamw_and_no_previous_gradient():
    params, opt = run_sequence(lambda ps: gk.optim.MARS(ps, kernel="foreach"), steps=3)
    for p in params:
        assert ("last_grad" in opt.state[p]) == (p.ndim >= 2)
    ps = make_params()
    opt = gk.optim.MARS(ps, mars_type="lion", kernel="foreach")
    run_sequence(None, steps=2, params=ps, opt=opt)
    for p in ps:  # the Lion form keeps no second moment for MARS tensors
        assert ("exp_avg_sq" in opt.state[p]) == (p.ndim < 2)


def test_mars_state_dict_roundtrip(kernel):
    assert_state_dict_roundtrip(lambda ps: gk.optim.MARS(two_groups(ps, lr=1e-3), lr=1e-2, weight_decay=0.1,
                                                         kernel=kernel))


@pytest.mark.parametrize("arg,value", [("gamma", -0.1), ("mars_type", "shampoo!"), ("lr_1d", -1.0),
                                       ("betas_1d", (0.9, 1.0)), ("weight_decay_1d", -1.0)])
def test_mars_bad_input_names_argument(arg, value):
    with pytest.raises(ValueError, match=arg.split("_1d")[0] if arg == "betas_1d" else arg):
        gk.optim.MARS(make_params(), **{arg: value}, kernel="foreach")
