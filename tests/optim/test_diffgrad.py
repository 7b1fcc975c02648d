import pytest
from pytorch_optimizer import DiffGrad as RefDiffGrad

import gradkit as gk
from tests.helpers import assert_parity, assert_state_dict_roundtrip, two_groups


@pytest.mark.parametrize("weight_decouple", [True, False])
@pytest.mark.parametrize("ams_bound", [False, True])
def test_diffgrad_parity_with_pytorch_optimizer(kernel, weight_decouple, ams_bound):
    kw = dict(lr=1e-2, betas=(0.85, 0.99), weight_decay=0.05, weight_decouple=weight_decouple, ams_bound=ams_bound)

    def ours(ps):
        return gk.optim.DiffGrad(two_groups(ps, lr=2e-3, weight_decay=0.2), **kw, kernel=kernel)

    def ref(ps):
        return RefDiffGrad(two_groups(ps, lr=2e-3, weight_decay=0.2), **kw, foreach=False)

    assert_parity(ours, ref)


def test_diffgrad_state_dict_roundtrip(kernel):
    assert_state_dict_roundtrip(lambda ps: gk.optim.DiffGrad(two_groups(ps, lr=1e-3), lr=1e-2, weight_decay=0.1,
                                                             kernel=kernel))
