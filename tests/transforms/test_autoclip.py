import numpy as np
import pytest
import torch

import gradkit as gk
from tests.helpers import make_params
from tests.transforms._common import assert_transform_roundtrip, set_grads

SPIKES = frozenset(range(7, 300, 23))


def paper_autoclip(params, history, percentile, window=None):
    """AutoClip as written in the paper: append the norm, clip to np.percentile of the history."""
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
    history.append(norm)
    h = history if window is None else history[-window:]
    torch.nn.utils.clip_grad_norm_(params, float(np.percentile(h, percentile)))


@pytest.mark.parametrize("percentile,history", [(10.0, None), (50.0, 20), (100.0, None)])
def test_autoclip_matches_paper_rule(percentile, history):
    ours, ref = make_params(), make_params()
    clip = gk.transforms.AutoClip(percentile, history=history)
    hist: list[float] = []
    n_clipped = 0
    for step in range(300):
        # A slowly growing norm with spikes: the percentile moves and both branches are taken.
        scale = 1.0 + step / 100
        set_grads(ours, step, SPIKES, scale=scale)
        set_grads(ref, step, SPIKES, scale=scale)
        n_clipped += clip(ours)["clipped"]
        paper_autoclip(ref, hist, percentile, history)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    if percentile < 100:
        assert 10 < n_clipped < 300
    else:
        assert n_clipped == 0  # the max of a history containing the current norm never clips


def test_bounded_history_keeps_last_n():
    clip = gk.transforms.AutoClip(50, history=5)
    params = make_params()
    for step in range(12):
        set_grads(params, step)
        clip(params)
    assert len(clip.state_dict()["norms"]) == 5


@pytest.mark.parametrize("bad", [0.0, -5.0, 100.5])
def test_percentile_out_of_range(bad):
    with pytest.raises(ValueError, match="percentile"):
        gk.transforms.AutoClip(bad)


def test_bad_history():
    with pytest.raises(ValueError, match="history"):
        gk.transforms.AutoClip(10, history=0)


def test_roundtrip():
    assert_transform_roundtrip(lambda: gk.transforms.AutoClip(25), spikes=SPIKES)
    assert_transform_roundtrip(lambda: gk.transforms.AutoClip(25, history=7), spikes=SPIKES)
