import pytest
from pytorch_optimizer import AdEMAMix as RefAdEMAMix

import gradkit as gk
from tests.helpers import assert_parity, assert_state_dict_roundtrip, two_groups


@pytest.mark.parametrize("t_alpha_beta3", [None, 150])
@pytest.mark.parametrize("weight_decouple", [False, True])
def test_ademamix_parity_with_pytorch_optimizer(kernel, t_alpha_beta3, weight_decouple):
    kw = dict(lr=1e-2, betas=(0.9, 0.99, 0.999), alpha=4.0, t_alpha_beta3=t_alpha_beta3, weight_decay=0.05,
              weight_decouple=weight_decouple)

    def ours(ps):
        return gk.optim.AdEMAMix(two_groups(ps, lr=2e-3, weight_decay=0.2), **kw, kernel=kernel)

    def ref(ps):
        return RefAdEMAMix(two_groups(ps, lr=2e-3, weight_decay=0.2), **kw, foreach=False)

    assert_parity(ours, ref)


def test_ademamix_fixed_decay_parity(kernel):
    kw = dict(lr=1e-2, weight_decay=1e-3, weight_decouple=True, fixed_decay=True)
    assert_parity(lambda ps: gk.optim.AdEMAMix(ps, **kw, kernel=kernel),
                  lambda ps: RefAdEMAMix(ps, **kw, foreach=False))


def test_ademamix_schedules_reach_targets():
    a, b3 = gk.optim.AdEMAMix.schedules(1, 5.0, 0.9, 0.9999, 1000)
    assert a == pytest.approx(5e-3) and 0.9 <= b3 < 0.9999
    assert gk.optim.AdEMAMix.schedules(1000, 5.0, 0.9, 0.9999, 1000) == pytest.approx((5.0, 0.9999))


def test_ademamix_state_dict_roundtrip(kernel):
    assert_state_dict_roundtrip(lambda ps: gk.optim.AdEMAMix(two_groups(ps, lr=1e-3), lr=1e-2, t_alpha_beta3=60,
                                                             kernel=kernel))
