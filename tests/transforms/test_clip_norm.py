import math

import pytest
import torch

import gradkit as gk
from tests.helpers import make_params
from tests.transforms._common import assert_transform_roundtrip, set_grads


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clipnorm_matches_torch_clip_grad_norm(norm_type, max_norm):
    ours, ref = make_params(), make_params()
    clip = gk.transforms.ClipNorm(max_norm, norm_type=norm_type)
    for step in range(20):
        set_grads(ours, step, scale=3.0)
        set_grads(ref, step, scale=3.0)
        stats = clip(ours)
        total = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type)
        torch.testing.assert_close(stats["grad_norm"], total, rtol=1e-6, atol=0)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    # The small threshold must have clipped, the large one must not have.
    assert (float(stats["clip_coef"]) < 1.0) == (max_norm < 1.0)


def test_clipnorm_result_has_the_max_norm():
    params = make_params()
    set_grads(params, 0, scale=10.0)
    gk.transforms.ClipNorm(2.0)(params)
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    assert abs(float(norm) - 2.0) < 1e-5


def test_clipvalue_matches_torch_clip_grad_value():
    ours, ref = make_params(), make_params()
    set_grads(ours, 3)
    set_grads(ref, 3)
    stats = gk.transforms.ClipValue(0.7)(ours)
    torch.nn.utils.clip_grad_value_(ref, 0.7)
    for a, b in zip(ours, ref):
        assert torch.equal(a.grad, b.grad)
    assert float(stats["max_abs"]) > 0.7  # the data had something to clip


def test_skips_params_without_grad_and_empty_input():
    params = make_params()
    set_grads(params, 0)
    params[1].grad = None
    gk.transforms.ClipNorm(0.1)(params)
    assert params[1].grad is None
    assert gk.transforms.ClipNorm(0.1)([]) == {}


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_max_norm(bad):
    with pytest.raises(ValueError, match="max_norm"):
        gk.transforms.ClipNorm(bad)


def test_bad_norm_type_and_clip_value():
    with pytest.raises(ValueError, match="norm_type"):
        gk.transforms.ClipNorm(1.0, norm_type=0.5)
    with pytest.raises(ValueError, match="clip_value"):
        gk.transforms.ClipValue(-0.1)
    with pytest.raises(ValueError, match="clip_value"):
        gk.transforms.ClipValue(0.0)


def test_stateless_roundtrip():
    assert_transform_roundtrip(lambda: gk.transforms.ClipNorm(1.0), steps=5)
    assert gk.transforms.ClipValue(1.0).state_dict() == {}
