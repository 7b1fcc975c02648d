"""Every transform on gradients that carry a graph (backward(create_graph=True), as AdaHessian needs).

The graph path replaces ``.grad`` out of place; it must give the same values as the in-place path, keep the graph
(a Hessian-vector product through the new gradient works) and report statistics that carry no graph.
"""

import copy
import inspect

import pytest
import torch

import gradkit as gk
from gradkit.transforms import Transform

TRANSFORMS = [getattr(gk.transforms, n) for n in gk.transforms.__all__
              if isinstance(getattr(gk.transforms, n), type) and issubclass(getattr(gk.transforms, n), Transform)
              and getattr(gk.transforms, n) is not Transform]


def _build(cls):
    kw = {n: 1.0 for n, p in inspect.signature(cls).parameters.items() if p.default is inspect.Parameter.empty}
    if cls is gk.transforms.ClipNorm:
        kw["max_norm"] = 0.05  # small enough to clip
    if cls is gk.transforms.AGC:
        kw["clip"] = 1e-3
    return cls(**kw)


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(6, 4, generator=gen).requires_grad_(), torch.randn(6, generator=gen).requires_grad_()]


def _loss(ps, t):
    x = torch.linspace(-1, 1, 4) * (1 + 0.1 * t)
    return torch.tanh(ps[0] @ x + ps[1]).pow(2).sum() + 0.1 * ps[0].pow(3).sum()


def _grads(ps, t, graph):
    gs = torch.autograd.grad(_loss(ps, t), ps, create_graph=graph)
    for p, g in zip(ps, gs):
        p.grad = g if graph else g.detach()


def test_every_transform_is_covered():
    assert len(TRANSFORMS) >= 7


@pytest.mark.parametrize("cls", TRANSFORMS, ids=lambda c: c.__name__)
def test_graph_path_equals_in_place_path_and_keeps_the_graph(cls):
    ps = _params()
    graph_t = _build(cls)
    plain_t = copy.deepcopy(graph_t)
    for t in range(4):
        _grads(ps, t, graph=True)
        originals = [p.grad for p in ps]
        out_graph = graph_t(ps)
        new = [p.grad for p in ps]
        _grads(ps, t, graph=False)
        out_plain = plain_t(ps)
        for g, p in zip(new, ps):
            assert torch.equal(g.detach(), p.grad), f"{cls.__name__} step {t}: graph path differs from in-place"
        assert out_graph.keys() == out_plain.keys()
        for v in out_graph.values():
            assert not (isinstance(v, torch.Tensor) and v.requires_grad), "statistics must not carry the graph"
        # The graph survived: differentiate through the (possibly replaced) gradient, as AdaHessian does.
        z = [torch.ones_like(p) for p in ps]
        linked = [g for g in new if g.requires_grad]
        assert linked, f"{cls.__name__} dropped the graph of every gradient"
        torch.autograd.grad(linked, ps, grad_outputs=z[:len(linked)], allow_unused=True)
        # Nothing was edited in place: the original graph gradients still hold autograd's values.
        assert all(o._version == 0 for o in originals)


def test_clip_norm_factor_is_a_constant_of_the_graph():
    ps = _params()
    _grads(ps, 0, graph=True)
    raw = [p.grad for p in ps]
    z = [torch.randn_like(p) for p in ps]
    hz = torch.autograd.grad(raw, ps, grad_outputs=z, retain_graph=True)
    out = gk.transforms.ClipNorm(0.05)(ps)
    assert float(out["clip_coef"]) < 1
    hz_clipped = torch.autograd.grad([p.grad for p in ps], ps, grad_outputs=z)
    for a, b in zip(hz_clipped, hz):
        torch.testing.assert_close(a, out["clip_coef"] * b)


def test_adahessian_with_clipping_through_the_pipeline_trains():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    pipe = gk.Pipeline(gk.sources.Backprop(model, create_graph=True), [gk.transforms.ClipNorm(1.0)],
                       gk.optim.AdaHessian(model.parameters(), lr=0.05, kernel="foreach"))
    first = float(pipe.step(lambda: torch.nn.functional.mse_loss(model(x), y)))
    for _ in range(30):
        last = float(pipe.step(lambda: torch.nn.functional.mse_loss(model(x), y)))
    assert last < first
