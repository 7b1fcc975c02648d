import copy

import pytest
import torch
from torch_optimizer import Adahessian as RefAdahessian

import gradkit as gk
from tests.helpers import grad_for, two_groups

# No 3-D tensor: the reference handles 0/1/2-D and 4-D (conv) parameters only.
SHAPES = ((33, 17), (17,), (3, 2, 3, 3), (1,), (16, 8))


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


def _loss(params, t):
    # Separable quartic plus a coupling term per tensor: the Hessian has off-diagonal entries, so the
    # Hutchinson estimate depends on the probes (identical probes are needed for the runs to agree).
    total = 0.0
    for i, p in enumerate(params):
        c = grad_for(t, p, i)
        total = total + (c * p).sum() + 0.5 * (p**2).sum() + 0.05 * (p**4).sum() + 0.01 * p.sum() ** 2
    return total


def _run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        _loss(params, t).backward(create_graph=True)
        opt.step()
    return params


def test_adahessian_parity_with_torch_optimizer_same_probes(kernel):
    kw = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-4, weight_decay=1e-3, hessian_power=0.7)
    ours_p, ref_p = _params(), _params()
    ours = gk.optim.AdaHessian(two_groups(ours_p, lr=0.03, weight_decay=1e-2), **kw, seed=7, kernel=kernel)
    # The reference draws its probes from the global generator, seeded by its `seed`: the same stream of
    # Rademacher draws in the same parameter order as ours.
    ref = RefAdahessian(two_groups(ref_p, lr=0.03, weight_decay=1e-2), **kw, seed=7)
    _run(ours, ours_p, 200)
    torch.manual_seed(7)
    _run(ref, ref_p, 200)
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(ours_p, ref_p))
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(ours_p, _params()))
    assert diff < 1e-5 and moved > 0.1, (diff, moved)


def test_probes_matter_and_are_seeded():
    def final(seed):
        ps = _params()
        return _run(gk.optim.AdaHessian(ps, seed=seed, kernel="foreach"), ps, 20)

    a, b, c = final(0), final(0), final(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert max(float((x - y).detach().abs().max()) for x, y in zip(a, c)) > 1e-4


def test_hutchinson_diagonal_is_exact_for_a_diagonal_hessian():
    # L = Σ 0.5·h·p²: H = diag(h), so |z ⊙ Hz| = h whatever the probe; the first step's v is (1−β2)·h².
    h = torch.tensor([0.5, 2.0, 3.0])
    p = torch.ones(3, requires_grad=True)
    opt = gk.optim.AdaHessian([p], kernel="loop")
    (0.5 * h * p**2).sum().backward(create_graph=True)
    opt.step()
    torch.testing.assert_close(opt.state[p]["exp_hessian_diag_sq"], (1 - 0.999) * h**2)
    assert p.grad.grad_fn is None  # the graph was released


def test_conv_kernels_are_spatially_averaged():
    w = torch.ones(2, 1, 2, 2, requires_grad=True)
    h = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 1, 2, 2)
    opt = gk.optim.AdaHessian([w], kernel="loop")
    (0.5 * h * w**2).sum().backward(create_graph=True)
    opt.step()
    torch.testing.assert_close(opt.state[w]["exp_hessian_diag_sq"], torch.full((2, 1, 2, 2), 1e-3 * 3.0**2))


def test_through_the_pipeline_with_create_graph_matches_standalone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)) for _ in range(10)]
    pipe = gk.Pipeline(gk.sources.Backprop(model, create_graph=True),
                       optimizer=gk.optim.AdaHessian(model.parameters(), lr=0.05, kernel="foreach"))
    opt = gk.optim.AdaHessian(twin.parameters(), lr=0.05, kernel="foreach")
    for x, y in data:
        pipe.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        opt.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward(create_graph=True)
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert float((model[0].weight - copy.deepcopy(model)[0].weight).abs().max()) == 0.0


def test_without_a_graph_the_error_says_what_to_do():
    model = torch.nn.Linear(3, 1)
    opt = gk.optim.AdaHessian(model.parameters())
    # In a Pipeline the mismatch is found at construction, before anything moved.
    with pytest.raises(ValueError, match="create_graph=True"):
        gk.Pipeline(gk.sources.Backprop(model), optimizer=opt)
    model(torch.ones(2, 3)).pow(2).sum().backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()


def test_constant_gradient_means_zero_curvature():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    opt = gk.optim.AdaHessian([a, b], kernel="foreach")
    ((a**2).sum() + (2 * b).sum()).backward(create_graph=True)  # b's gradient is constant: no graph
    opt.step()
    assert torch.equal(opt.state[b]["exp_hessian_diag_sq"], torch.zeros(2))


def test_adahessian_state_dict_roundtrip_including_probe_stream(kernel):
    def make(ps):
        return gk.optim.AdaHessian(two_groups(ps, lr=0.05), lr=0.1, weight_decay=1e-3, seed=3, kernel=kernel)

    straight = _params()
    _run(make(straight), straight, 40)
    first = _params()
    opt = make(first)
    _run(opt, first, 20)
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    fresh = make(resumed)
    fresh.load_state_dict(saved)
    _run(fresh, resumed, 20, start=20)
    for x, y in zip(straight, resumed):
        assert torch.equal(x, y)


# -- the optimizer contract checks that need graph gradients (skipped in test_contract.py, see conftest) ---
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_gradient_leaves_everything_untouched(policy):
    ps = _params()
    opt = gk.optim.AdaHessian(ps, on_nonfinite=policy, kernel="foreach")
    _run(opt, ps, 3)
    before_p = [p.detach().clone() for p in ps]
    before_s = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    (_loss(ps, 3) * torch.tensor([1.0, float("nan")]).sum()).backward(create_graph=True)
    if policy == "raise":
        with pytest.raises(gk.NonFiniteError):
            opt.step()
    else:
        opt.step()
        assert opt.nonfinite_skips == 1
    assert all(torch.equal(a, b) for a, b in zip(before_p, ps))
    after = opt.state_dict()
    for k, st in before_s["state"].items():
        for name, v in st.items():
            w = after["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w
    assert torch.equal(before_s["gradkit"]["probe_generator"], after["gradkit"]["probe_generator"])


def test_scheduler_closure_and_frozen_parameters():
    ps = _params()
    opt = gk.optim.AdaHessian(ps, kernel="foreach")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    frozen = ps[0].detach().clone()

    def closure():
        opt.zero_grad()
        loss = _loss(ps[1:], 0)
        loss.backward(create_graph=True)
        return loss

    for _ in range(4):
        loss = opt.step(closure)
        sched.step()
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.15 * 0.25)
    assert torch.equal(frozen, ps[0]) and len(opt.state[ps[0]]) == 0
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in ps)


@pytest.mark.parametrize("arg,value", [("hessian_power", 1.5), ("seed", -1), ("seed", 0.5), ("weight_decay", -1.0)])
def test_adahessian_bad_input_names_argument(arg, value):
    with pytest.raises(ValueError, match=arg):
        gk.optim.AdaHessian(_params(), **{arg: value}, kernel="foreach")
