"""Loading foreign states: torch.optim's Adam/AdamW states are normalised; incompatible states fail at load time."""

import copy
import warnings

import pytest
import torch

import gradkit as gk
from tests.helpers import make_params, run_sequence


def _torch_run(cls, steps, **kw):
    return run_sequence(lambda p: cls(p, **kw), steps=steps)


@pytest.mark.parametrize("pair", [(torch.optim.AdamW, gk.optim.AdamW), (torch.optim.Adam, gk.optim.Adam)],
                         ids=["AdamW", "Adam"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_torch_state_loads_normalised_and_continues_like_torch(pair, amsgrad):
    torch_cls, gk_cls = pair
    kw = dict(lr=1e-2, weight_decay=1e-2, amsgrad=amsgrad)
    params, opt = _torch_run(torch_cls, 10, **kw)
    saved = copy.deepcopy(opt.state_dict())  # torch's state_dict aliases its buffers (and step tensors)
    assert isinstance(saved["state"][0]["step"], torch.Tensor)
    # torch continues ...
    straight, _ = run_sequence(lambda p: opt, steps=10, start=10, params=params, opt=opt)
    # ... and gradkit, from the same state, continues identically (within the parity tolerance of test_adam.py).
    ours_params = [p.detach().clone().requires_grad_() for p in _torch_run(torch_cls, 10, **kw)[0]]
    ours = gk_cls(ours_params, kernel="foreach", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning storm
        ours.load_state_dict(saved)
        assert all(type(st["step"]) is int and st["step"] == 10 for st in ours.state.values())
        assert set(ours.param_groups[0]) == {"params", *gk_cls(make_params(), kernel="foreach").defaults}
        resumed, _ = run_sequence(lambda p: ours, steps=10, start=10, params=ours_params, opt=ours)
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert all(not torch.equal(a, b) for a, b in zip(resumed, make_params()))


def test_step_counts_form_one_bucket_after_loading_a_torch_state(monkeypatch):
    params, opt = _torch_run(torch.optim.AdamW, 3)
    ours = gk.optim.AdamW([p.detach().clone().requires_grad_() for p in params], kernel="foreach")
    ours.load_state_dict(opt.state_dict())
    calls = []
    import gradkit.optim.adam as adam

    real = adam.ADAM.__call__
    monkeypatch.setattr(type(adam.ADAM), "__call__", lambda self, *a, **k: calls.append(1) or real(*a, **k))
    for p in ours.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    ours.step()
    assert len(calls) == 1  # one kernel call for all parameters, not one per parameter


def test_adamw_state_into_prodigy_fails_at_load_time_naming_the_missing_keys():
    params, opt = _torch_run(torch.optim.AdamW, 2)
    prodigy = gk.optim.Prodigy(make_params(), kernel="foreach")
    before = prodigy.state_dict()
    with pytest.raises(ValueError, match=r"Prodigy.load_state_dict: param_groups\[0\] lacks the hyper-parameters "
                                         r"\[.*'beta3'.*\]"):
        prodigy.load_state_dict(opt.state_dict())
    assert prodigy.state_dict() == before
    gk_state = run_sequence(lambda p: gk.optim.AdamW(p, kernel="foreach"), steps=2)[1].state_dict()
    with pytest.raises(ValueError, match="beta3"):
        gk.optim.Prodigy(make_params(), kernel="foreach").load_state_dict(gk_state)


def test_missing_per_parameter_buffers_are_named():
    params, opt = run_sequence(lambda p: gk.optim.AdamW(p, kernel="foreach"), steps=2)
    sd = opt.state_dict()
    del sd["state"][1]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"state of parameter 1 .* lacks \['exp_avg_sq'\]"):
        gk.optim.AdamW(make_params(), kernel="foreach").load_state_dict(sd)


@pytest.mark.parametrize("src, dst, key", [
    (lambda p: torch.optim.AdamW(p, maximize=True), gk.optim.AdamW, "maximize=True"),
    (lambda p: torch.optim.Adam(p, weight_decay=0.1, decoupled_weight_decay=True), gk.optim.Adam,
     "decoupled_weight_decay=True"),
    (lambda p: torch.optim.Adam(p, weight_decay=0.1), gk.optim.AdamW, "decoupled_weight_decay=False"),
])
def test_states_that_would_change_the_maths_are_refused(src, dst, key):
    _, opt = run_sequence(src, steps=2)
    with pytest.raises(ValueError, match=key):
        dst(make_params(), kernel="foreach").load_state_dict(opt.state_dict())


def test_a_loaded_hyper_parameter_is_validated():
    _, opt = run_sequence(lambda p: torch.optim.AdamW(p), steps=1)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = float("inf")
    with pytest.raises(ValueError, match="lr"):
        gk.optim.AdamW(make_params(), kernel="foreach").load_state_dict(sd)
