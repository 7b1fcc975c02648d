import pytest
import torch
from torch import nn

import gradkit as gk
from tests.helpers import make_params
from tests.transforms._common import assert_transform_roundtrip, set_grads

zclip = pytest.importorskip("zclip")

SPIKES = frozenset({40, 41, 90, 150, 151, 152, 220, 260, 299})


@pytest.mark.parametrize("kw", [
    dict(mode="zscore", clip_option="adaptive_scaling"),
    dict(mode="zscore", clip_option="mean"),
    dict(mode="percentile"),
    dict(mode="zscore", max_grad_norm=None, skip_update_on_spike=True),
    dict(mode="percentile", max_grad_norm=None, alpha=0.9, z_thresh=2.0, warmup_steps=10),
])
def test_zclip_matches_package_through_spikes(kw):
    ours, ref = make_params(), [nn.Parameter(p.detach()) for p in make_params()]
    ref_module = nn.ParameterList(ref)  # holds these very Parameters, so the package edits ref's grads
    kw = {"max_grad_norm": 1e3, **kw}  # high enough that the adaptive threshold, not the cap, decides
    mine = gk.transforms.ZClip(**kw)
    theirs = zclip.ZClip(**{k: v for k, v in kw.items()})
    clipped_steps = []
    for step in range(320):
        set_grads(ours, step, SPIKES, spike=25.0)
        set_grads(ref, step, SPIKES, spike=25.0)
        stats = mine(ours)
        theirs.step(ref_module)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        if stats["clipped"]:
            clipped_steps.append(step)
    assert abs(mine.mean - theirs.mean) <= 1e-5 * abs(theirs.mean)
    assert abs(mine.var - theirs.var) <= 1e-4 * abs(theirs.var) + 1e-9
    # Every spike after warm-up was caught, and clipping is not happening on every step.
    warm = kw.get("warmup_steps", 25)
    assert {s for s in SPIKES if s >= warm} <= set(clipped_steps)
    assert len(clipped_steps) < 160


def test_zclip_cap_applies_during_warmup_like_package():
    ours, ref = make_params(), [nn.Parameter(p.detach()) for p in make_params()]
    mine, theirs = gk.transforms.ZClip(max_grad_norm=0.5), zclip.ZClip(max_grad_norm=0.5)
    for step in range(60):
        set_grads(ours, step, SPIKES)
        set_grads(ref, step, SPIKES)
        mine(ours)
        theirs.step(nn.ParameterList(ref))
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,value", [("alpha", 1.0), ("z_thresh", 0.0), ("max_grad_norm", -1.0),
                                        ("warmup_steps", 0), ("mode", "median"), ("clip_option", "max"),
                                        ("eps", 0.0)])
def test_bad_input(name, value):
    with pytest.raises(ValueError, match=name):
        gk.transforms.ZClip(**{name: value})


def test_roundtrip_across_warmup_and_after():
    for steps in (10, 40):  # mid warm-up, and after it
        assert_transform_roundtrip(lambda: gk.transforms.ZClip(max_grad_norm=None), steps=steps, spikes=SPIKES)
