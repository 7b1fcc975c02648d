"""Every source runs through gk.Pipeline with every optimizer and every transform (discovered dynamically).

Two steps on a tiny model: a smoke test of the composition, not of convergence. Constructors are called
with defaults; a required argument without default gets 1.0 (e.g. ClipNorm's max_norm).
"""

import inspect

import pytest
import torch
import torch.nn.functional as F

import gradkit as gk
from gradkit.models import mlp
from gradkit.transforms import Transform

SOURCES = {
    "Backprop": lambda m, graph: gk.sources.Backprop(m, create_graph=graph),
    "ForwardGradient": lambda m, graph: gk.sources.ForwardGradient(m, n_directions=2, seed=0),
    "SPSA": lambda m, graph: gk.sources.SPSA(m, eps=1e-3, n_directions=2, seed=0),
    "ES": lambda m, graph: gk.sources.ES(m, sigma=0.05, population=4, seed=0),
    "LikelihoodRatio": lambda m, graph: gk.sources.LikelihoodRatio(m, sigma=0.1, n_samples=2, seed=0),
}


def _discover(module, base, exclude=()):
    return [getattr(module, n) for n in module.__all__
            if isinstance(getattr(module, n), type) and issubclass(getattr(module, n), base)
            and getattr(module, n) not in exclude]


OPTIMIZERS = list(gk.optim.available().values())
TRANSFORMS = [None, *_discover(gk.transforms, Transform, (Transform,))]
OTHER_SOURCES = [n for n in gk.sources.__all__ if isinstance(getattr(gk.sources, n), type)
                 and issubclass(getattr(gk.sources, n), gk.sources.Source) and n not in SOURCES
                 and n not in ("Source", "ZerothOrder", "ZOSGD")
                 and not issubclass(getattr(gk.sources, n), gk.sources.LocalRule)]


def test_every_source_is_covered():
    # ZOSGD is the fused mode (source and optimizer at once; tests in test_zosgd.py); ZerothOrder is a base
    # class. Local learning rules take
    # a batch closure and build their own losses: every rule x every optimizer runs in test_local_rules.py.
    assert not OTHER_SOURCES, f"add these sources to the cross-product test: {OTHER_SOURCES}"


def _build(cls, *args, **kw):
    sig = inspect.signature(cls).parameters
    if "kernel" in sig:
        kw.setdefault("kernel", "foreach")
    names = list(sig)[len(args):]
    for name in names:
        prm = sig[name]
        if prm.default is inspect.Parameter.empty and prm.kind in (prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY) \
                and name not in kw:
            kw[name] = 1.0
    return cls(*args, **kw)


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: "none" if t is None else t.__name__)
@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_source_x_optimizer_x_transform(source, opt_cls, transform):
    graph = bool(getattr(opt_cls, "needs_graph", False))
    if graph and source != "Backprop":
        pytest.skip(f"{opt_cls.__name__} differentiates through the gradient (create_graph=True); "
                    f"{source} builds no graph")
    model = mlp((5, 6, 3), seed=0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    before = [p.detach().clone() for p in model.parameters()]
    pipe = gk.Pipeline(SOURCES[source](model, graph),
                       transforms=[] if transform is None else [_build(transform)],
                       optimizer=_build(opt_cls, model.parameters()))
    for _ in range(2):
        loss = pipe.step(lambda: F.cross_entropy(model(x), y))
        assert torch.isfinite(loss)
    assert pipe.steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
