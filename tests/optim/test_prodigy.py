import copy

import prodigyopt
import pytest
import torch

import gradkit as gk
from tests.helpers import assert_parity, assert_state_dict_roundtrip, make_params, run_sequence, two_groups


def test_prodigy_parity(kernel, capsys):
    # Default options (decoupled weight decay), a different weight decay and eps in the second group.
    kw = dict(weight_decay=0.1, d0=1e-4)
    group2 = dict(weight_decay=0.3, eps=1e-6)
    assert_parity(lambda ps: gk.optim.Prodigy(two_groups(ps, **group2), **kw, kernel=kernel),
                  lambda ps: prodigyopt.Prodigy(two_groups(ps, **group2), **kw))


@pytest.mark.parametrize("kernel_", ["loop", "foreach"])
@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_prodigy_parity_all_options(kernel_, beta1):
    # Coupled decay, bias correction, β3, d_coef, growth_rate, safeguard_warmup in one group only; β1 = 0 drops m.
    kw = dict(weight_decay=0.1, decouple=False, betas=(beta1, 0.99), beta3=0.9, use_bias_correction=True,
              d_coef=0.5, growth_rate=1.05, d0=1e-4)
    assert_parity(lambda ps: gk.optim.Prodigy(two_groups(ps, safeguard_warmup=True), **kw, kernel=kernel_),
                  lambda ps: prodigyopt.Prodigy(two_groups(ps, safeguard_warmup=True), **kw))


def test_state_dict_roundtrip_including_d(kernel):
    def make(ps):
        return gk.optim.Prodigy(two_groups(ps), weight_decay=0.1, kernel=kernel)

    assert_state_dict_roundtrip(make)
    _, opt = run_sequence(make, 30)
    fresh = make(make_params())
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for key in ("d", "d_max", "d_numerator", "k"):
        assert fresh.param_groups[1][key] == opt.param_groups[1][key]
    assert opt.param_groups[0]["d"] > 1e-6


def test_without_beta1_no_first_moment_is_kept():
    params, opt = run_sequence(lambda ps: gk.optim.Prodigy(ps, betas=(0.0, 0.99), kernel="foreach"), 3)
    assert "exp_avg" not in opt.state[params[0]]
    assert set(opt.state[params[0]]) == {"s", "exp_avg_sq", "p0"}


def test_all_zero_gradients_change_nothing():
    ps = make_params()
    before = [p.detach().clone() for p in ps]
    opt = gk.optim.Prodigy(ps, weight_decay=0.5, kernel="loop")
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps))
    assert opt.param_groups[0]["k"] == 0 and opt.param_groups[0]["d"] == 1e-6


def test_unequal_lr_between_groups_raises():
    params, opt = run_sequence(lambda ps: gk.optim.Prodigy(two_groups(ps), kernel="loop"), 2)
    opt.param_groups[0]["lr"] = 0.3
    with pytest.raises(ValueError, match="lr"):
        opt.step()


@pytest.mark.parametrize("bad, name", [
    (dict(d0=0.0), "d0"), (dict(d0=-1e-6), "d0"), (dict(d_coef=0.0), "d_coef"), (dict(beta3=1.0), "beta3"),
    (dict(beta3=-0.1), "beta3"), (dict(growth_rate=0.9), "growth_rate"), (dict(betas=(1.0, 0.999)), "betas"),
    (dict(eps=-1.0), "eps"), (dict(weight_decay=-1.0), "weight_decay"),
])
def test_bad_input_names_argument(bad, name):
    with pytest.raises(ValueError, match=name):
        gk.optim.Prodigy(make_params(), **bad)
