"""The optimizer contract, checked for every gradkit optimizer: bad input, non-finite policy, torch tooling."""

import copy
import warnings

import pytest
import torch

import gradkit as gk
from tests.helpers import feed_grads, make_params


def all_optimizers():
    return list(gk.optim.available().values())


OPTIMIZERS = all_optimizers()


def _make(cls, params, **kw):
    # Every optimizer constructs from params alone (defaults follow the paper / reference package).
    return cls(params, kernel=kw.pop("kernel", "foreach"), **kw)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_negative_lr_names_lr(cls):
    import inspect

    if "lr" not in inspect.signature(cls).parameters:
        pytest.skip(f"{cls.__name__} takes no learning rate")
    with pytest.raises(ValueError, match="lr"):
        _make(cls, make_params(), lr=-1.0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_non_finite_lr_names_lr(cls, bad):
    import inspect

    if "lr" not in inspect.signature(cls).parameters:
        pytest.skip(f"{cls.__name__} takes no learning rate")
    with pytest.raises(ValueError, match="lr"):
        _make(cls, make_params(), lr=bad)
    opt = _make(cls, make_params()[:2])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": make_params()[2:], "lr": bad})


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_betas_out_of_range_names_betas(cls):
    import inspect

    sig = inspect.signature(cls).parameters
    if "betas" not in sig:
        pytest.skip(f"{cls.__name__} has no betas")
    default = sig["betas"].default
    bad = (1.0,) + tuple(default[1:])
    with pytest.raises(ValueError, match="betas"):
        _make(cls, make_params(), betas=bad)
    with pytest.raises(ValueError, match="betas"):
        _make(cls, make_params(), betas=(-0.1,) + tuple(default[1:]))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_nonpositive_eps_names_eps(cls):
    import inspect

    if "eps" not in inspect.signature(cls).parameters:
        pytest.skip(f"{cls.__name__} has no eps")
    for bad in (0.0, -1e-8):
        with pytest.raises(ValueError, match="eps"):
            _make(cls, make_params(), eps=bad)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_unknown_kernel_names_kernel(cls):
    with pytest.raises(ValueError, match="kernel"):
        cls(make_params(), kernel="triton")
    with pytest.raises(ValueError, match="on_nonfinite"):
        cls(make_params(), on_nonfinite="maybe")


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_bad_param_group_rejected_and_not_added(cls):
    import inspect

    if "lr" not in inspect.signature(cls).parameters:
        pytest.skip(f"{cls.__name__} takes no learning rate")
    ps = make_params()
    opt = _make(cls, ps[:2])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": ps[2:], "lr": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_gradient_leaves_everything_untouched(cls, policy):
    params = make_params()
    opt = _make(cls, params, on_nonfinite=policy)
    for t in range(5):
        feed_grads(cls, params, t)
        opt.step()
    before_p = [p.detach().clone() for p in params]
    before_s = copy.deepcopy(opt.state_dict())
    feed_grads(cls, params, 5, nan=True)
    if policy == "raise":
        with pytest.raises(gk.NonFiniteError):
            opt.step()
    else:
        opt.step()
        assert opt.nonfinite_skips == 1
    assert all(torch.equal(a, b) for a, b in zip(before_p, params))
    after_s = opt.state_dict()
    for k, st in before_s["state"].items():
        for name, v in st.items():
            w = after_s["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, name


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_works_with_torch_lr_scheduler_and_zero_grad(cls):
    params = make_params()
    opt = _make(cls, params)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lr0 = opt.param_groups[0]["lr"]
    for t in range(4):
        feed_grads(cls, params, t)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 * 0.25)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_step_with_closure_returns_loss(cls):
    w = torch.randn(5, requires_grad=True)
    opt = _make(cls, [w])

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward(create_graph=cls.needs_graph)
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_parameters_without_grad_are_untouched(cls):
    ps = make_params()
    opt = _make(cls, ps)
    frozen = ps[0].detach().clone()
    for t in range(3):
        feed_grads(cls, ps, t, only=ps[1:])
        opt.step()
    assert torch.equal(frozen, ps[0])
    assert len(opt.state[ps[0]]) == 0


def test_auto_kernel_resolves_and_warns_once_on_fallback(monkeypatch):
    import gradkit._kernels.compiling as K

    monkeypatch.setattr(K, "_probe_result", (False, "test: no compiler"))
    monkeypatch.setattr(K, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        opt = gk.optim.AdamW(make_params(), kernel="auto")
    assert opt.kernel == "foreach"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gk.optim.Lion(make_params(), kernel="auto").kernel == "foreach"


def test_mixed_dtypes_in_one_group(kernel):
    ps = [torch.randn(8, 4, requires_grad=True), torch.randn(16, dtype=torch.float64, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in ps]
    ours = gk.optim.AdamW(ps, lr=1e-2, kernel=kernel)
    theirs = torch.optim.AdamW(ref, lr=1e-2)
    for _ in range(20):
        for a, b in zip(ps, ref):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ps, ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_capability_table_is_honoured(cls):
    caps = gk.optim.capabilities()[cls.__name__]
    assert caps["needs_graph"] == cls.needs_graph
    if not caps["supports_complex"]:
        z = torch.randn(3, dtype=torch.complex64, requires_grad=True)
        opt = _make(cls, [z])
        z.grad = torch.ones_like(z)
        with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support complex"):
            opt.step()
    if not caps["supports_sparse"]:
        w = torch.randn(4, 2, requires_grad=True)
        opt = _make(cls, [w])
        w.grad = torch.zeros(4, 2).to_sparse()
        with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse"):
            opt.step()
    if caps["needs_graph"]:  # a Pipeline whose source builds no graph is refused before anything runs
        model = torch.nn.Linear(3, 1)
        with pytest.raises(ValueError, match="create_graph=True"):
            gk.Pipeline(gk.sources.Backprop(model), optimizer=_make(cls, model.parameters()))
