import pytest
import torch

import gradkit as gk
from tests.transforms._common import assert_transform_roundtrip

agc_mod = pytest.importorskip("pytorch_optimizer.optimizer.agc")

SHAPES = ((33, 17), (17,), (6, 3, 3, 3), (1,), (20, 5))


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    for i, p in enumerate(ps):
        # Per-unit gradient scales spread over four decades: some units are clipped, some are not.
        scale = torch.logspace(-4, 0, p.shape[0]).reshape(-1, *([1] * (p.ndim - 1))) if p.ndim > 1 else 0.05 * i
        p.grad = torch.randn(p.shape, generator=gen) * scale
    return ps


@pytest.mark.parametrize("clip,eps", [(0.01, 1e-3), (0.1, 1e-3), (0.05, 10.0)])
def test_agc_matches_pytorch_optimizer(clip, eps):
    ps = _params()
    expected = [agc_mod.agc(p.detach(), p.grad, agc_eps=eps, agc_clip_val=clip) for p in ps]
    stats = gk.transforms.AGC(clip=clip, eps=eps)(ps)
    for p, e in zip(ps, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=0)
    assert 0 < int(stats["clipped_units"]) < stats["units"]


def test_agc_3d_units_are_output_rows():
    p = torch.randn(4, 3, 5).requires_grad_()
    p.grad = torch.randn(4, 3, 5) * 10
    gk.transforms.AGC(clip=0.01)(p for p in [p])
    ratio = p.grad.flatten(1).norm(dim=1) / p.detach().flatten(1).norm(dim=1).clamp_min(1e-3)
    torch.testing.assert_close(ratio, torch.full((4,), 0.01), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name,kw", [("clip", dict(clip=-0.01)), ("clip", dict(clip=0.0)), ("eps", dict(eps=-1.0))])
def test_bad_input(name, kw):
    with pytest.raises(ValueError, match=name):
        gk.transforms.AGC(**kw)


def test_stateless_roundtrip():
    assert_transform_roundtrip(lambda: gk.transforms.AGC(clip=0.05), steps=3)
