import lion_pytorch
import pytest

import gradkit as gk
from tests.helpers import assert_parity, assert_state_dict_roundtrip, two_groups


@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_lion_parity_with_lion_pytorch(kernel, wd):
    # Lion steps by ±lr: a sign taken of a value within one rounding of zero could flip between two
    # implementations. With this sequence no such tie occurs, and every element must agree to 1e-5.
    def ours(ps):
        return gk.optim.Lion(two_groups(ps, lr=3e-4, weight_decay=0.1), lr=1e-3, betas=(0.9, 0.99),
                             weight_decay=wd, kernel=kernel)

    def ref(ps):
        return lion_pytorch.Lion(two_groups(ps, lr=3e-4, weight_decay=0.1), lr=1e-3, betas=(0.9, 0.99),
                                 weight_decay=wd)

    assert_parity(ours, ref)


def test_lion_state_dict_roundtrip(kernel):
    assert_state_dict_roundtrip(lambda ps: gk.optim.Lion(two_groups(ps, lr=1e-4), lr=1e-3, weight_decay=0.1,
                                                         kernel=kernel))
