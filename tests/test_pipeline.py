import copy

import pytest
import torch
import torch.nn.functional as F

import gradkit as gk
from gradkit.models import mlp


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _setup(on_nonfinite="raise", opt_cls=gk.optim.AdamW):
    torch.manual_seed(0)
    model = mlp((8, 16, 3), seed=0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    pipe = gk.Pipeline(gk.sources.Backprop(model), optimizer=opt_cls(model.parameters(), kernel="foreach"),
                       on_nonfinite=on_nonfinite)
    return model, x, y, pipe


def _snapshot(model, pipe):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(pipe.state_dict())


def _assert_same(model, pipe, snap):
    params, state = snap
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    now = pipe.state_dict()
    assert now["steps"] == state["steps"]
    opt = pipe.name_of(pipe.optimizer)
    for k, st in state["stages"][opt]["state"].items():
        for name, v in st.items():
            w = now["stages"][opt]["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


def test_pipeline_trains_and_equals_manual_loop():
    model, x, y, pipe = _setup()
    twin = copy.deepcopy(model)
    opt = gk.optim.AdamW(twin.parameters(), kernel="foreach")
    for _ in range(20):
        loss = pipe.step(lambda: F.cross_entropy(model(x), y))
        opt.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        opt.step()
    assert loss.ndim == 0 and not loss.requires_grad
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())
    assert pipe.steps == 20


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_nonfinite_raises_and_changes_nothing(bad):
    model, x, y, pipe = _setup("raise")
    for _ in range(3):
        pipe.step(lambda: F.cross_entropy(model(x), y))
    snap = _snapshot(model, pipe)

    def closure():
        out = model(x)
        if bad == "loss":
            return F.cross_entropy(out, y) * float("nan")
        return F.cross_entropy(_NaNGrad.apply(out), y)

    with pytest.raises(gk.NonFiniteError):
        pipe.step(closure)
    _assert_same(model, pipe, snap)


def test_nonfinite_skip_counts_and_continues():
    model, x, y, pipe = _setup("skip")
    pipe.step(lambda: F.cross_entropy(model(x), y))
    snap = _snapshot(model, pipe)
    out = pipe.step(lambda: F.cross_entropy(_NaNGrad.apply(model(x)), y))
    assert torch.isnan(out)
    assert pipe.skipped == 1
    _assert_same(model, pipe, snap)
    pipe.step(lambda: F.cross_entropy(model(x), y))
    assert pipe.steps == 2


def test_closure_must_return_scalar_with_grad():
    model, x, y, pipe = _setup()
    with pytest.raises(ValueError, match="scalar"):
        pipe.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(ValueError, match="require grad"):
        pipe.step(lambda: F.cross_entropy(model(x).detach(), y))
    with pytest.raises(ValueError, match="scalar tensor"):
        pipe.step(lambda: 1.0)


def test_pipeline_rejects_bad_stages():
    model = mlp((4, 2), seed=0)
    with pytest.raises(ValueError, match="source"):
        gk.Pipeline(object(), optimizer=gk.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="optimizer"):
        gk.Pipeline(gk.sources.Backprop(model), optimizer=None)
    with pytest.raises(ValueError, match="on_nonfinite"):
        gk.Pipeline(gk.sources.Backprop(model), optimizer=gk.optim.AdamW(model.parameters()), on_nonfinite="no")


def test_pipeline_state_dict_resumes_bit_for_bit():
    def run(n, model, pipe, x, y):
        for _ in range(n):
            pipe.step(lambda: F.cross_entropy(model(x), y))

    model, x, y, pipe = _setup()
    run(20, model, pipe, x, y)
    straight = [p.detach().clone() for p in model.parameters()]

    model, x, y, pipe = _setup()
    run(10, model, pipe, x, y)
    saved = copy.deepcopy(pipe.state_dict())
    weights = copy.deepcopy(model.state_dict())
    model2, _, _, pipe2 = _setup()
    model2.load_state_dict(weights)
    pipe2.load_state_dict(saved)
    run(10, model2, pipe2, x, y)
    assert all(torch.equal(a, b) for a, b in zip(straight, model2.parameters()))


def test_backprop_unused_parameter_has_no_grad_and_is_not_stepped():
    model = mlp((4, 3), seed=0)
    extra = torch.nn.Parameter(torch.ones(2))
    params = [*model.parameters(), extra]
    pipe = gk.Pipeline(gk.sources.Backprop(params), optimizer=gk.optim.AdamW(params, kernel="loop"))
    pipe.step(lambda: model(torch.ones(1, 4)).sum())
    assert torch.equal(extra.detach(), torch.ones(2))


def test_transform_and_controller_hooks_are_called():
    calls = []

    class Scale(gk.transforms.Transform):
        def __call__(self, params):
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(0.0)
            calls.append("t")
            return {"scaled": 1}

    class Stop(gk.control.Controller):
        def after_step(self, loss):
            calls.append("c")
            self.should_stop = True

    model, x, y, _ = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    pipe = gk.Pipeline(gk.sources.Backprop(model), [Scale()], gk.optim.Lion(model.parameters(), kernel="loop"),
                       [Stop()])
    pipe.step(lambda: F.cross_entropy(model(x), y))
    assert calls == ["t", "c"] and pipe.should_stop
    assert pipe.stats == {"scale/scaled": 1}
    # Zeroed gradients: Lion's sign(0) = 0 and no weight decay, so parameters must not move.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
