import copy

import pytest
import schedulefree
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

# The reference starts in eval mode and must be put in train mode before stepping; ours starts in train mode
# (identical before the first step, when x = y = z).


def _trained(opt):
    opt.train()
    return opt


SGD_KW = dict(lr=0.1, momentum=0.8, weight_decay=0.1, warmup_steps=20, r=0.5, weight_lr_power=2.0)
ADAMW_KW = dict(lr=0.01, betas=(0.85, 0.99), weight_decay=0.1, warmup_steps=20, r=0.5, weight_lr_power=1.0)
GROUP2 = dict(lr=0.05, weight_decay=0.3)


def _pair(variant, kernel):
    if variant == "sgd":
        return (lambda ps: gk.optim.ScheduleFreeSGD(two_groups(ps, **GROUP2), **SGD_KW, kernel=kernel),
                lambda ps: _trained(schedulefree.SGDScheduleFree(two_groups(ps, **GROUP2), **SGD_KW)))
    group2 = dict(GROUP2, lr=0.005)
    return (lambda ps: gk.optim.ScheduleFreeAdamW(two_groups(ps, **group2), **ADAMW_KW, kernel=kernel),
            lambda ps: _trained(schedulefree.AdamWScheduleFree(two_groups(ps, **group2), **ADAMW_KW)))


@pytest.mark.parametrize("variant", ["sgd", "adamw"])
def test_parity_with_schedulefree_train_and_eval_points(kernel, variant):
    ours, ref = _pair(variant, kernel)
    assert_parity(ours, ref)  # the training point y
    p_ours, o_ours = run_sequence(ours, 200)
    p_ref, o_ref = run_sequence(ref, 200)
    o_ours.eval()
    o_ref.eval()
    assert max_abs_diff(p_ours, p_ref) <= 1e-5  # the averaged point x
    assert max_abs_diff(p_ours, make_params()) > 1e-3
    # Back to y and on: the swap round trip keeps both in step.
    o_ours.train()
    o_ref.train()
    run_sequence(ours, 20, start=200, params=p_ours, opt=o_ours)
    run_sequence(ref, 20, start=200, params=p_ref, opt=o_ref)
    assert max_abs_diff(p_ours, p_ref) <= 1e-5


@pytest.mark.parametrize("cls", [gk.optim.ScheduleFreeSGD, gk.optim.ScheduleFreeAdamW])
def test_state_dict_roundtrip(kernel, cls):
    assert_state_dict_roundtrip(lambda ps: cls(two_groups(ps, lr=0.01), lr=0.02, warmup_steps=10, weight_decay=0.1,
                                               kernel=kernel))


def test_state_dict_records_eval_mode_and_resumes_bit_exactly():
    def make(ps):
        return gk.optim.ScheduleFreeAdamW(two_groups(ps, lr=0.01), lr=0.02, warmup_steps=5, kernel="foreach")

    def swap_at_25(opt, params, t):
        if t == 25:
            opt.eval()
            opt.train()

    straight, _ = run_sequence(make, 50, closure_hook=swap_at_25)
    first, opt = run_sequence(make, 25)
    opt.eval()  # checkpoints are taken at x, as the reference recommends
    saved = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone().requires_grad_() for p in first]
    fresh = make(params)
    fresh.load_state_dict(saved)
    assert not fresh.training and all(not g["train_mode"] for g in fresh.param_groups)
    with pytest.raises(RuntimeError, match="eval mode"):
        for p in params:
            p.grad = torch.ones_like(p)
        fresh.step()
    fresh.train()
    resumed, _ = run_sequence(make, 25, start=25, params=params, opt=fresh)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [gk.optim.ScheduleFreeSGD, gk.optim.ScheduleFreeAdamW])
def test_step_in_eval_mode_raises_and_changes_nothing(cls):
    params, opt = run_sequence(lambda ps: cls(ps, kernel="loop"), 5)
    opt.eval()
    before = [p.detach().clone() for p in params]
    k = opt.param_groups[0]["k"]
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"train\(\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert opt.param_groups[0]["k"] == k
    opt.eval()  # idempotent
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_eval_point_is_the_average_of_the_z_iterates():
    # The paper's defining property: with constant weights (r = 0, no warm-up) x_T is the plain average of
    # z_1 .. z_T (c_t = 1/t); y_T = (1-β) z_T + β x_T is where gradients are taken.
    torch.manual_seed(0)
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    opt = gk.optim.ScheduleFreeSGD([x], lr=0.1, momentum=0.7, kernel="loop")
    zs = [x.detach().clone()]
    for _ in range(30):
        x.grad = torch.randn(7, dtype=torch.float64)
        opt.step()
        zs.append(opt.state[x]["z"].clone())
    opt.eval()
    torch.testing.assert_close(x.detach(), torch.stack(zs[1:]).mean(0), atol=1e-12, rtol=0)
    opt.train()
    y = 0.3 * zs[-1] + 0.7 * torch.stack(zs[1:]).mean(0)
    torch.testing.assert_close(x.detach(), y, atol=1e-12, rtol=0)


def test_group_added_later_joins_current_mode():
    ps = make_params()
    opt = gk.optim.ScheduleFreeSGD(ps[:2], kernel="loop")
    opt.eval()
    opt.add_param_group({"params": ps[2:]})
    assert not opt.param_groups[1]["train_mode"]
    opt.train()
    assert opt.training


@pytest.mark.parametrize("bad, name", [
    (dict(momentum=0.0), "momentum"), (dict(momentum=1.0), "momentum"), (dict(lr=-1.0), "lr"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=2.5), "warmup_steps"), (dict(r=-1.0), "r"), (dict(weight_lr_power=-1.0), "weight_lr_power"),
])
def test_sgd_bad_input_names_argument(bad, name):
    with pytest.raises(ValueError, match=name):
        gk.optim.ScheduleFreeSGD(make_params(), **bad)


@pytest.mark.parametrize("bad, name", [
    (dict(betas=(0.0, 0.999)), "betas"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=0.0), "eps"),
    (dict(r=-0.5), "r"),
])
def test_adamw_bad_input_names_argument(bad, name):
    with pytest.raises(ValueError, match=name):
        gk.optim.ScheduleFreeAdamW(make_params(), **bad)
