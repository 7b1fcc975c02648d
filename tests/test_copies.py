"""Every public stateful class survives ``copy.deepcopy`` and ``pickle`` and then steps bit-identically.

Classes are discovered (every optimizer, source, transform, controller, searcher, and Pipeline), used for two
steps, copied together with the parameters they act on, then the original and the copy take two more identical
steps; parameters, gradients, ``state_dict()`` and statistics must agree bit for bit.
"""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
import torch.nn.functional as F

import gradkit as gk
from gradkit.models import mlp
from gradkit.search.base import Searcher


def _discover(module, base, exclude=()):
    out = {}
    for n in module.__all__:
        obj = getattr(module, n)
        if isinstance(obj, type) and issubclass(obj, base) and obj not in exclude and not inspect.isabstract(obj):
            out[n] = obj
    return out


OPTIMIZERS = gk.optim.available()
SOURCES = _discover(gk.sources, gk.sources.Source, (gk.sources.Source, getattr(gk.sources, "LocalRule", None)))
TRANSFORMS = _discover(gk.transforms, gk.transforms.Transform, (gk.transforms.Transform,))
CONTROLLERS = _discover(gk.control, gk.control.Controller, (gk.control.Controller,))
SEARCHERS = _discover(gk.search, Searcher, (Searcher,))


# -- comparison -----------------------------------------------------------------------------------------------
def _same(a, b, where="value"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _grads(params):
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)


def _feed(params, t, graph=False):
    """Deterministic gradients for step ``t`` (graph-carrying ones from a loss when ``graph``)."""
    g = torch.Generator().manual_seed(100 + t)
    if graph:
        for p in params:
            p.grad = None
        w = [torch.randn(p.shape, generator=g) for p in params]
        sum((q * q * wi).sum() + (q * wi).sum() for q, wi in zip(params, w)).backward(create_graph=True)
        return
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).requires_grad_() for s in ((6, 4), (6,), (3, 2, 2))]


# -- kits: make() -> bundle, step(bundle, t), observe(bundle) -> comparable ----------------------------------
def _optimizer_kit(cls):
    graph = getattr(cls, "needs_graph", False)

    def make():
        ps = _params()
        return ps, cls(ps, kernel="foreach")

    def step(b, t):
        ps, opt = b
        _feed(ps, t, graph)
        opt.step()

    def observe(b):
        ps, opt = b
        return [p.detach() for p in ps], opt.state_dict()

    return make, step, observe


def _averager_kit():
    def make():
        model = mlp((5, 4, 3), seed=0)
        return model, gk.optim.PolynomialDecayAverager(model, gamma=3.0)

    def step(b, t):
        model, avg = b
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(t * 10 + i)))
        avg.step()

    return make, step, lambda b: b[1].state_dict()


_SOURCE_ARGS = {
    "ForwardGradient": dict(n_directions=2, seed=0),
    "SPSA": dict(eps=1e-3, n_directions=2, seed=0),
    "ES": dict(sigma=0.05, population=4, seed=0),
    "LikelihoodRatio": dict(sigma=0.1, n_samples=2, seed=0),
    "ZOSGD": dict(lr=1e-2, eps=1e-3, n_directions=2, seed=0),
}


def _source_kit(name, cls):
    x, y = _data()

    def make():
        model = mlp((5, 6, 3), seed=0)
        return model, cls(model, **_SOURCE_ARGS.get(name, {}))

    def step(b, t):
        model, src = b
        src.estimate(lambda: F.cross_entropy(model(x[t % 4:]), y[t % 4:]))

    def observe(b):
        model, src = b
        ps = list(model.parameters())
        return [p.detach() for p in ps], _grads(ps), src.state_dict()

    return make, step, observe


def _local_rule_kits():
    try:
        from tests.sources.test_local_rules import RULES
        from tests.sources.test_local_rules import _data as local_data
    except ImportError:  # the local learning rules are not in this tree
        return {}
    kits = {}
    for name, factory in RULES.items():
        def make(factory=factory):
            rule, _ = factory()
            return (rule,)

        def step(b, t, local_data=local_data):
            x, y = local_data(seed=t)
            b[0].estimate(lambda: (x, y))

        def observe(b):
            ps = list(b[0].parameters())
            return [p.detach() for p in ps], _grads(ps), b[0].state_dict()

        kits[name] = (make, step, observe)
    return kits


def _transform_kit(cls):
    required = {n: 1.0 for n, p in inspect.signature(cls).parameters.items() if p.default is inspect.Parameter.empty}

    def make():
        return _params(), cls(**required)

    def step(b, t):
        ps, tr = b
        _feed(ps, t)
        tr(ps)

    def observe(b):
        ps, tr = b
        return _grads(ps), tr.state_dict(), tr.stats()

    return make, step, observe


def _controller_kit(cls):
    x, y = _data()
    args = {"GradES": dict(tau=1e9, patience=3), "EarlyStopping": dict(patience=2)}.get(cls.__name__, {})

    def make():
        model = mlp((5, 6, 3), seed=0)
        kw = dict(args)
        if "model" in inspect.signature(cls).parameters:
            kw["model"] = model
        return model, cls(**kw)

    def step(b, t):
        model, c = b
        ps = [p for p in model.parameters() if p.requires_grad]
        loss = F.cross_entropy(model(x), y) * (1.0 + t)  # a loss that worsens: EarlyStopping counts bad checks
        loss.backward()
        if getattr(c, "needs_transform", False):
            c(ps)
        c.after_step(loss.detach())
        with torch.no_grad():
            for p in ps:
                if p.grad is not None:
                    p.sub_(0.1 * p.grad)
                p.grad = None

    def observe(b):
        model, c = b
        return [p.detach() for p in model.parameters()], [p.requires_grad for p in model.parameters()], \
            c.state_dict(), c.stats(), bool(c.should_stop)

    return make, step, observe


def _searcher_kit(cls):
    def make():
        return (cls(torch.full((4,), 1.5, dtype=torch.float64), 0.5, seed=0),)

    def step(b, t):
        s = b[0]
        xs = s.ask()
        s.tell(xs, (xs ** 2).sum(-1))

    return make, step, lambda b: (b[0].state_dict(), b[0].best)


def _pipeline_kit(kind):
    x, y = _data()

    def make():
        model = mlp((5, 6, 3), seed=0)
        if kind == "backprop":
            pipe = gk.Pipeline(gk.sources.Backprop(model), [gk.transforms.ClipNorm(0.5), gk.transforms.AutoClip(50.0)],
                               gk.optim.AdamW(model.parameters(), kernel="foreach"),
                               [gk.control.EarlyStopping(patience=50)], on_nonfinite="skip")
        else:
            g = gk.control.GradES(model, tau=1e9, patience=3, observe="transform")
            pipe = gk.Pipeline(gk.sources.SPSA(model, seed=0), {"grades": g, "slow": gk.transforms.Grokfast()},
                               gk.optim.Lion(model.parameters(), lr=1e-3, kernel="foreach"), {"grades": g})
        return model, pipe

    def step(b, t):
        model, pipe = b
        pipe.step(lambda: F.cross_entropy(model(x), y))

    def observe(b):
        model, pipe = b
        return [p.detach() for p in model.parameters()], pipe.state_dict(), pipe.stats, list(pipe.stages)

    return make, step, observe


KITS = {
    **{f"optim.{n}": _optimizer_kit(c) for n, c in OPTIMIZERS.items()},
    "optim.PolynomialDecayAverager": _averager_kit(),
    **{f"sources.{n}": _source_kit(n, c) for n, c in SOURCES.items()},
    **{f"sources.{n}": k for n, k in _local_rule_kits().items()},
    **{f"transforms.{n}": _transform_kit(c) for n, c in TRANSFORMS.items()},
    **{f"control.{n}": _controller_kit(c) for n, c in CONTROLLERS.items()},
    **{f"search.{n}": _searcher_kit(c) for n, c in SEARCHERS.items()},
    "Pipeline.backprop": _pipeline_kit("backprop"),
    "Pipeline.zeroth_order": _pipeline_kit("zo"),
}


def test_discovery_covers_every_public_stateful_class():
    local = getattr(gk.sources, "LocalRule", None)
    rules = {f"sources.{n}" for n, c in vars(gk.sources).items() if n in gk.sources.__all__ and local is not None
             and isinstance(c, type) and issubclass(c, local) and c is not local}
    assert rules <= set(KITS), f"local rules without a copy kit: {sorted(rules - set(KITS))}"
    assert len(KITS) >= 40


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", sorted(KITS))
def test_copy_steps_identically(name, how):
    make, step, observe = KITS[name]
    torch.manual_seed(0)
    bundle = make()
    for t in range(2):
        step(bundle, t)
    twin = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    # (torch copies parameters without their .grad, so gradients are compared from the next step on)
    for t in range(2, 4):
        step(bundle, t)
        step(twin, t)
        _same(observe(bundle), observe(twin), f"{name} at step {t} after the {how}")
