import copy

import dadaptation
import pytest
import torch

import gradkit as gk
from tests.helpers import (
    assert_parity,
    assert_state_dict_roundtrip,
    make_params,
    max_abs_diff,
    run_sequence,
    two_groups,
)

# The reference reads weight_decay and momentum (DAdaptSGD), betas and decouple (DAdaptAdam) from the first param
# group only; ours honours weight_decay and momentum per group. Parity runs therefore vary between the two groups
# only what the reference also reads per group (eps, layer_scale; weight_decay for decoupled DAdaptAdam).


def test_dadapt_sgd_parity(kernel):
    kw = dict(momentum=0.9, weight_decay=0.1)
    assert_parity(lambda ps: gk.optim.DAdaptSGD(two_groups(ps), **kw, kernel=kernel),
                  lambda ps: dadaptation.DAdaptSGD(two_groups(ps), **kw))


@pytest.mark.parametrize("kernel_", ["loop", "foreach"])
def test_dadapt_sgd_parity_options(kernel_):
    kw = dict(momentum=0.0, d0=1e-2, growth_rate=1.05, lr=0.5)
    assert_parity(lambda ps: gk.optim.DAdaptSGD(two_groups(ps, lr=0.5), **kw, kernel=kernel_),
                  lambda ps: dadaptation.DAdaptSGD(two_groups(ps, lr=0.5), **kw))


def test_dadapt_adam_parity(kernel):
    kw = dict(weight_decay=0.1, betas=(0.9, 0.99))
    assert_parity(lambda ps: gk.optim.DAdaptAdam(two_groups(ps, layer_scale=0.5, eps=1e-6), **kw, kernel=kernel),
                  lambda ps: dadaptation.DAdaptAdam(two_groups(ps, layer_scale=0.5, eps=1e-6), **kw))


@pytest.mark.parametrize("kernel_", ["loop", "foreach"])
def test_dadapt_adam_parity_decoupled_bias_correction_growth(kernel_, capsys):
    kw = dict(weight_decay=0.1, decouple=True, use_bias_correction=True, d0=1e-4, growth_rate=1.1)
    assert_parity(lambda ps: gk.optim.DAdaptAdam(two_groups(ps, weight_decay=0.3), **kw, kernel=kernel_),
                  lambda ps: dadaptation.DAdaptAdam(two_groups(ps, weight_decay=0.3), **kw))


@pytest.mark.parametrize("cls", [gk.optim.DAdaptSGD, gk.optim.DAdaptAdam])
def test_state_dict_roundtrip_including_d(kernel, cls):
    def make(ps):
        return cls(two_groups(ps), weight_decay=0.1, kernel=kernel)

    assert_state_dict_roundtrip(make)
    _, opt = run_sequence(make, 30)
    sd = copy.deepcopy(opt.state_dict())
    fresh = make(make_params())
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["d"] == opt.param_groups[0]["d"] > 1e-6  # d has grown and is restored
    assert fresh.param_groups[0]["numerator_weighted"] == opt.param_groups[0]["numerator_weighted"]


@pytest.mark.parametrize("cls", [gk.optim.DAdaptSGD, gk.optim.DAdaptAdam])
def test_d_is_global_and_grows_from_d0(cls):
    _, opt = run_sequence(lambda ps: cls(two_groups(ps), kernel="foreach"), 50)
    ds = {g["d"] for g in opt.param_groups}
    assert len(ds) == 1 and ds.pop() > 2 * 1e-6


@pytest.mark.parametrize("cls", [gk.optim.DAdaptSGD, gk.optim.DAdaptAdam])
def test_unequal_lr_between_groups_raises_before_any_change(cls):
    params, opt = run_sequence(lambda ps: cls(two_groups(ps), kernel="loop"), 3)
    opt.param_groups[1]["lr"] = 0.5
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.parametrize("cls", [gk.optim.DAdaptSGD, gk.optim.DAdaptAdam])
def test_group_with_lr_zero_is_frozen(cls):
    ps = make_params()
    frozen = [p.detach().clone() for p in ps[2:]]
    params, _ = run_sequence(lambda p: cls(two_groups(p, lr=0.0), kernel="loop"), 10, params=ps)
    assert all(torch.equal(a, b) for a, b in zip(frozen, params[2:]))
    assert max_abs_diff(params[:2], make_params()[:2]) > 0


@pytest.mark.parametrize("bad, name", [
    (dict(d0=0.0), "d0"), (dict(d0=-1.0), "d0"), (dict(growth_rate=0.5), "growth_rate"), (dict(lr=-1.0), "lr"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"),
])
def test_sgd_bad_input_names_argument(bad, name):
    with pytest.raises(ValueError, match=name):
        gk.optim.DAdaptSGD(make_params(), **bad)


@pytest.mark.parametrize("bad, name", [
    (dict(d0=0.0), "d0"), (dict(growth_rate=0.99), "growth_rate"), (dict(betas=(0.9, 1.0)), "betas"),
    (dict(eps=0.0), "eps"), (dict(layer_scale=-1.0), "layer_scale"),
])
def test_adam_bad_input_names_argument(bad, name):
    with pytest.raises(ValueError, match=name):
        gk.optim.DAdaptAdam(make_params(), **bad)
