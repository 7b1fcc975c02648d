"""The non-finite policy table of README ("Non-finite values"), checked value by value at every core stage.

Rows: optimizers (every gk.optim class), Pipeline, Backprop. Columns: raise, skip, worst, ignore.
"""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

import gradkit as gk
from gradkit.models import mlp
from tests.helpers import make_params

OPTIMIZERS = list(gk.optim.available().values())


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _feed(cls, params, bad=False):
    """Gradients for one step: graph-carrying ones for an optimizer that differentiates through them."""
    for p in params:
        p.grad = None
    if getattr(cls, "needs_graph", False):
        loss = sum((p * p).sum() for p in params)
        if bad:
            loss = loss * float("nan")
        loss.backward(create_graph=True)
        return
    for p in params:
        p.grad = torch.randn_like(p)
    if bad:
        params[-1].grad[0] = float("nan")


def _opt(cls, params, **kw):
    return cls(params, kernel="foreach", **kw)


# -- optimizers ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_optimizer_default_is_raise(cls):
    assert inspect.signature(cls).parameters["on_nonfinite"].default == "raise"
    assert _opt(cls, make_params()).on_nonfinite == "raise"


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_optimizer_worst_is_refused_at_construction(cls):
    with pytest.raises(ValueError, match="on_nonfinite='worst' cannot be honoured by " + cls.__name__):
        _opt(cls, make_params(), on_nonfinite="worst")


@pytest.mark.parametrize("policy", ["raise", "skip", "ignore"])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_optimizer_policy(cls, policy):
    params = make_params()
    opt = _opt(cls, params, on_nonfinite=policy)
    torch.manual_seed(0)
    for _ in range(2):
        _feed(cls, params)
        opt.step()
    before_p = [p.detach().clone() for p in params]
    before_s = copy.deepcopy(opt.state_dict())
    _feed(cls, params, bad=True)
    if policy == "ignore":  # no check: the step runs on the NaN gradient, as torch.optim would
        try:
            opt.step()
        except gk.NonFiniteError:
            raise AssertionError("on_nonfinite='ignore' must not check") from None
        except (RuntimeError, ValueError):  # the algorithm itself choked on NaN (e.g. a Cholesky): torch's behaviour
            assert opt.nonfinite_skips == 0
            return
        assert opt.nonfinite_skips == 0
        assert any(not torch.equal(a, b) for a, b in zip(before_p, params))
        return
    if policy == "raise":
        with pytest.raises(gk.NonFiniteError, match=cls.__name__):
            opt.step()
    else:
        opt.step()
    assert opt.nonfinite_skips == (1 if policy == "skip" else 0)
    assert all(torch.equal(a, b) for a, b in zip(before_p, params))
    after = opt.state_dict()
    for k, st in before_s["state"].items():
        for name, v in st.items():
            w = after["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, name


def test_optimizer_check_is_skipped_only_when_a_pipeline_vouches_for_the_gradients(monkeypatch):
    calls = []
    import gradkit.optim._base as ob
    import gradkit.pipeline as pl
    import gradkit.sources.base as sb

    for mod in (ob, pl, sb):
        real = mod.all_finite
        monkeypatch.setattr(mod, "all_finite", lambda ts, _r=real, _m=mod.__name__: calls.append(_m) or _r(ts))
    model = mlp((5, 6, 3), seed=0)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))

    def step(transforms):
        calls.clear()
        pipe = gk.Pipeline(gk.sources.Backprop(model), transforms, gk.optim.AdamW(model.parameters(), kernel="loop"))
        pipe.step(lambda: F.cross_entropy(model(x), y))
        return list(calls)

    # Backprop checks once; clipping keeps finite values finite, so AdamW trusts that check.
    assert step([gk.transforms.ClipNorm(1.0)]) == ["gradkit.sources.base"]
    # Grokfast adds a filtered signal (it could overflow): AdamW checks again.
    assert step([gk.transforms.Grokfast()]) == ["gradkit.sources.base", "gradkit.optim._base"]
    # Alone, the optimizer checks.
    opt = gk.optim.AdamW(model.parameters(), kernel="loop")
    calls.clear()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert calls == ["gradkit.optim._base"] and not opt._grads_checked


# -- Pipeline -----------------------------------------------------------------------------------------------
def _pipeline(policy="raise", source_policy="raise", opt_policy="raise"):
    model = mlp((5, 6, 3), seed=0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    pipe = gk.Pipeline(gk.sources.Backprop(model, on_nonfinite=source_policy), [gk.transforms.AutoClip(50.0)],
                       gk.optim.AdamW(model.parameters(), kernel="foreach", on_nonfinite=opt_policy),
                       [gk.control.EarlyStopping(patience=100)], on_nonfinite=policy)
    pipe.step(lambda: F.cross_entropy(model(x), y))
    return model, x, y, pipe


def _bad_grad(model, x, y):
    return lambda: F.cross_entropy(_NaNGrad.apply(model(x)), y)


def _same(model, pipe, params, state):
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    now = pipe.state_dict()
    assert now["steps"] == state["steps"]
    assert now["stages"]["auto_clip"] == state["stages"]["auto_clip"]
    assert now["stages"]["early_stopping"] == state["stages"]["early_stopping"]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("source_policy", ["raise", "ignore"])
def test_pipeline_raise_and_skip_change_nothing(policy, source_policy):
    model, x, y, pipe = _pipeline(policy, source_policy)
    params, state = [p.detach().clone() for p in model.parameters()], copy.deepcopy(pipe.state_dict())
    if policy == "raise":
        with pytest.raises(gk.NonFiniteError):
            pipe.step(_bad_grad(model, x, y))
    else:
        assert torch.isnan(pipe.step(_bad_grad(model, x, y)))
        assert pipe.skipped == 1
    _same(model, pipe, params, state)


@pytest.mark.parametrize("policy", ["raise", "skip", "ignore"])
def test_a_source_that_skips_makes_the_step_a_skip(policy):
    model, x, y, pipe = _pipeline(policy, source_policy="skip")
    params, state = [p.detach().clone() for p in model.parameters()], copy.deepcopy(pipe.state_dict())
    assert torch.isnan(pipe.step(_bad_grad(model, x, y)))
    assert pipe.skipped == 1 and pipe.source.nonfinite_skips == 1
    _same(model, pipe, params, state)


def test_pipeline_ignore_leaves_the_decision_to_the_stages():
    model, x, y, pipe = _pipeline("ignore")  # Backprop and AdamW keep their default, raise
    with pytest.raises(gk.NonFiniteError, match="Backprop"):
        pipe.step(_bad_grad(model, x, y))
    model, x, y, pipe = _pipeline("ignore", source_policy="ignore", opt_policy="ignore")
    loss = pipe.step(_bad_grad(model, x, y))  # torch's behaviour: nothing checks, the NaN reaches the weights
    assert torch.isfinite(loss) and pipe.steps == 2 and pipe.skipped == 0
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_pipeline_refuses_worst():
    model = mlp((5, 3), seed=0)
    with pytest.raises(ValueError, match="on_nonfinite='worst' cannot be honoured by Pipeline"):
        gk.Pipeline(gk.sources.Backprop(model), optimizer=gk.optim.AdamW(model.parameters()), on_nonfinite="worst")


# -- Backprop -------------------------------------------------------------------------------------------------
def _backprop_setup(policy):
    model = mlp((5, 6, 3), seed=0)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    src = gk.sources.Backprop(model, on_nonfinite=policy)
    src.estimate(lambda: F.cross_entropy(model(x), y))
    return model, x, y, src, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_backprop_raise_leaves_grad_as_before(bad):
    model, x, y, src, grads = _backprop_setup("raise")
    closure = (lambda: F.cross_entropy(model(x), y) * float("inf")) if bad == "loss" else _bad_grad(model, x, y)
    with pytest.raises(gk.NonFiniteError, match=f"non-finite {bad if bad == 'loss' else 'gradient'}"):
        src.estimate(closure)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert src.nonfinite_skips == 0 and not src.checked_finite


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_backprop_skip_writes_no_gradient_returns_nan_and_counts(bad):
    model, x, y, src, _ = _backprop_setup("skip")
    closure = (lambda: F.cross_entropy(model(x), y) * float("nan")) if bad == "loss" else _bad_grad(model, x, y)
    assert torch.isnan(src.estimate(closure))
    assert all(p.grad is None for p in model.parameters())
    assert src.nonfinite_skips == 1
    assert torch.isfinite(src.estimate(lambda: F.cross_entropy(model(x), y)))  # and goes on
    assert src.checked_finite


def test_backprop_ignore_writes_what_autograd_gives():
    model, x, y, src, _ = _backprop_setup("ignore")
    loss = src.estimate(_bad_grad(model, x, y))
    assert torch.isfinite(loss) and torch.isnan(next(model.parameters()).grad).all()
    assert src.nonfinite_skips == 0 and not src.checked_finite


def test_backprop_refuses_worst():
    with pytest.raises(ValueError, match="on_nonfinite='worst' cannot be honoured by Backprop"):
        gk.sources.Backprop(mlp((5, 3), seed=0), on_nonfinite="worst")


def test_a_closure_that_calls_backward_itself_gets_a_clear_error_and_no_gradient():
    model, x, y, src, grads = _backprop_setup("raise")

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"closure called backward\(\) itself"):
        src.estimate(closure)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # as before the call
    fresh = gk.sources.Backprop(mlp((5, 3), seed=1))
    with pytest.raises(ValueError, match="backward"):
        fresh.estimate(lambda: _backward_and_return(fresh.params))
    assert all(p.grad is None for p in fresh.params)


def _backward_and_return(params):
    loss = sum(p.sum() for p in params)
    loss.backward(retain_graph=True)
    return loss



# -- the check itself ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_is_exact_whatever_the_magnitude(dtype):
    from gradkit._kernels import all_finite

    big = torch.finfo(dtype).max / 2  # finite, but its square (and the 2-norm of two of them) overflows
    ok = [torch.randn(5, 3).to(dtype), torch.full((7,), big, dtype=dtype), torch.zeros(0, dtype=dtype)]
    assert all_finite(ok)
    assert all_finite(ok + [torch.ones(2, dtype=torch.float64)])  # mixed dtypes
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(4, 4).to(dtype)
        t[1, 2] = bad
        assert not all_finite(ok + [t])
        assert not all_finite([t.requires_grad_() * 1.0])  # a graph-carrying tensor is read, not differentiated
    assert all_finite([])
