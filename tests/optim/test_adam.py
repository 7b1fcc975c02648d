import pytest
import torch

import gradkit as gk
from tests.helpers import assert_parity, assert_state_dict_roundtrip, two_groups


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_parity_with_torch(kernel, amsgrad):
    def ours(ps):
        return gk.optim.AdamW(two_groups(ps, lr=3e-3, weight_decay=0.3), lr=1e-2, betas=(0.8, 0.95),
                              weight_decay=0.1, amsgrad=amsgrad, kernel=kernel)

    def ref(ps):
        return torch.optim.AdamW(two_groups(ps, lr=3e-3, weight_decay=0.3), lr=1e-2, betas=(0.8, 0.95),
                                 weight_decay=0.1, amsgrad=amsgrad)

    assert_parity(ours, ref)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_parity_with_torch(kernel, amsgrad):
    def ours(ps):
        return gk.optim.Adam(two_groups(ps, lr=3e-3, weight_decay=0.0), lr=1e-2, weight_decay=0.05,
                             amsgrad=amsgrad, kernel=kernel)

    def ref(ps):
        return torch.optim.Adam(two_groups(ps, lr=3e-3, weight_decay=0.0), lr=1e-2, weight_decay=0.05,
                                amsgrad=amsgrad)

    assert_parity(ours, ref)


def test_adamw_state_dict_roundtrip(kernel):
    assert_state_dict_roundtrip(lambda ps: gk.optim.AdamW(two_groups(ps, lr=1e-3), lr=1e-2, amsgrad=True,
                                                          kernel=kernel))


def _online_counterexample(amsgrad: bool, steps: int = 6000, C: float = 3.0) -> float:
    """Reddi et al. (2018), Sec. 3: f_t(x) = C·x if t mod 3 == 1 else −x on [−1, 1]; the optimum is x = −1.

    With β1 = 0 and β2 = 1/(1+C²), Adam's rare large gradient is forgotten by v faster than its effect
    accumulates, so Adam drifts to x = +1; AMSGrad's max keeps the step small after a large gradient.
    """
    x = torch.zeros(1, requires_grad=True)
    opt = gk.optim.Adam([x], lr=0.1, betas=(0.0, 1.0 / (1.0 + C * C)), eps=1e-8, amsgrad=amsgrad, kernel="loop")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (t + 1) ** 0.5)
    for t in range(1, steps + 1):
        x.grad = torch.tensor([C if t % 3 == 1 else -1.0])
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(-1.0, 1.0)  # projection onto the feasible set
    return float(x.detach())


def test_amsgrad_paper_counterexample():
    adam_x = _online_counterexample(amsgrad=False)
    ams_x = _online_counterexample(amsgrad=True)
    assert adam_x > 0.9, f"Adam should drift to the wrong end (+1), got {adam_x}"
    assert ams_x < -0.9, f"AMSGrad should reach the optimum (-1), got {ams_x}"
