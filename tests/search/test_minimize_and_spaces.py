"""minimize(), ParamVector and LoRASingularValues."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradkit as gk
from gradkit.models import mlp
from gradkit.search import functions as F
from gradkit.search.spaces import LoRASingularValues


# ---- minimize ------------------------------------------------------------------------------------------------
def test_minimize_batched_and_single_candidate_agree():
    a = gk.search.minimize(F.rosenbrock, torch.zeros(4), 0.3, seed=2, budget=600)
    b = gk.search.minimize(lambda x: F.rosenbrock(x[None])[0], torch.zeros(4), 0.3, seed=2, budget=600,
                           batched=False)
    assert torch.equal(a.x, b.x) and a.fun == b.fun and a.nfev == b.nfev


def test_minimize_result_budget_history_and_target():
    r = gk.search.minimize(F.sphere, torch.ones(5), 1.0, method="sep_cmaes", seed=0, budget=500)
    assert r.nfev <= 500 and r.stop == {"budget": 500} and r.nit == len(r.history)
    fs = [f for _, f in r.history]
    assert all(b <= a for a, b in zip(fs, fs[1:])) and fs[-1] == r.fun
    assert float(F.sphere(r.x[None])) == pytest.approx(r.fun)
    t = gk.search.minimize(F.sphere, torch.ones(5), 1.0, seed=0, ftarget=1e-3)
    assert t.success and t.fun <= 1e-3 and t.nfev < 10_000


def test_minimize_bad_input():
    with pytest.raises(ValueError, match="method"):
        gk.search.minimize(F.sphere, torch.ones(3), 1.0, method="bfgs")
    with pytest.raises(ValueError, match="batched"):
        gk.search.minimize(lambda x: x.sum(), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="budget"):
        gk.search.minimize(F.sphere, torch.ones(3), 1.0, budget=0)
    with pytest.raises(ValueError, match="sigma0"):
        gk.search.minimize(F.sphere, torch.ones(3), 0.0)
    with pytest.raises(gk.NonFiniteError):
        gk.search.minimize(lambda x: torch.full((len(x),), float("nan")), torch.ones(3), 1.0)


# ---- ParamVector -----------------------------------------------------------------------------------------------
def test_param_vector_shares_storage_and_round_trips():
    model = mlp((5, 4, 3), seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    pv = gk.search.ParamVector(model)
    assert pv.shared and pv.dim == sum(p.numel() for p in before)
    torch.testing.assert_close(pv.get(), torch.cat([b.reshape(-1) for b in before]))
    x = torch.randn(pv.dim, dtype=torch.float64)
    pv.set(x)
    torch.testing.assert_close(model[0].weight.reshape(-1), x[:20].float())
    # the parameters are views of one buffer: writing it changes the model with no copy
    assert model[0].weight.untyped_storage().data_ptr() == pv.vector.untyped_storage().data_ptr()
    pv.vector[0] = 7.0
    assert model[0].weight[0, 0] == 7.0
    # training still works on the re-pointed parameters
    loss = model(torch.randn(2, 5)).sum()
    loss.backward()
    assert model[0].weight.grad is not None


def test_param_vector_evaluate_restores_and_unflatten():
    model = mlp((3, 2), seed=0)
    pv = gk.search.ParamVector(model, share=False)
    x0 = pv.get()
    inp = torch.randn(4, 3)
    cands = x0 + 0.1 * torch.randn(5, pv.dim)
    vals = pv.evaluate(lambda: model(inp).sum(), cands)
    assert torch.equal(pv.get(), x0)
    params = pv.unflatten(cands)
    ref = torch.func.vmap(lambda p: torch.func.functional_call(model, p, (inp,)).sum())(params)
    torch.testing.assert_close(vals, ref.double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x"):
        pv.set(torch.zeros(pv.dim + 1))
    with pytest.raises(ValueError, match="parameters"):
        gk.search.ParamVector(nn.ReLU())


def test_search_a_model_with_cmaes():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    xs = torch.randn(64, 3)
    ys = xs @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    pv = gk.search.ParamVector(model)

    def loss():
        return ((model(xs)[:, 0] - ys) ** 2).mean()

    r = gk.search.minimize(lambda c: pv.evaluate(loss, c), pv.get().double(), 0.5, seed=0, ftarget=1e-10,
                           budget=5_000)
    assert r.fun <= 1e-10


# ---- LoRASingularValues ------------------------------------------------------------------------------------------
def test_lora_singular_values_adds_u_diag_s_vt():
    model = mlp((6, 5, 4), seed=0)
    x = torch.randn(7, 6)
    base = model(x)
    w = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    space = LoRASingularValues(model, rank=2, basis="random", seed=1)
    assert space.dim == 4 and torch.equal(space.x0, torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(model(x), base)  # s = 0: the model is unchanged
    s = torch.tensor([0.5, -1.0, 2.0, 0.3])
    space.set(s)
    ref = mlp((6, 5, 4), seed=0)
    with torch.no_grad():
        for i, lin in enumerate((ref[0], ref[2])):
            u, v = space.U[i], space.V[i]
            lin.weight += u @ torch.diag(s[2 * i:2 * i + 2].float()) @ v.T
            torch.testing.assert_close(space.delta_weight(i), u @ torch.diag(s[2 * i:2 * i + 2].float()) @ v.T)
    torch.testing.assert_close(model(x), ref(x))
    # U, V orthonormal; the model's own weights untouched
    for u in space.factors():
        torch.testing.assert_close(u.T @ u, torch.eye(2), atol=1e-6, rtol=0)
    assert torch.equal(model[0].weight, w[0]) and torch.equal(model[2].weight, w[1])
    # population mode: one forward pass evaluates every candidate
    cands = torch.randn(3, 4, dtype=torch.float64)
    with space.population(cands):
        batched = model(x.expand(3, *x.shape))
    for k in range(3):
        with space.at(cands[k]):
            torch.testing.assert_close(batched[k], model(x), rtol=1e-5, atol=1e-5)
    space.remove()
    torch.testing.assert_close(model(x), base)


def test_lora_from_adapters_starts_at_the_adapters():
    model = mlp((6, 5), seed=0)
    a, b = torch.randn(3, 6), torch.randn(5, 3)
    x = torch.randn(4, 6)
    want = model(x) + x @ (b @ a).T
    space = LoRASingularValues(model, rank=3, adapters={"0": (a, b)})
    assert bool((space.x0 > 0).all())
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_lora_singular_values_by_backprop_and_search():
    model = mlp((6, 5), seed=0)
    space = LoRASingularValues(model, rank=2, basis="weight")
    # The top singular direction of W: scaling it is exactly what s does with the weight basis.
    x = torch.randn(4, 6)
    space.vector.requires_grad_(True)
    model(x).sum().backward()
    assert space.vector.grad is not None and space.vector.grad.shape == (2,)
    space.vector.requires_grad_(False)
    with pytest.raises(ValueError, match="rank"):
        LoRASingularValues(model, rank=9)
    with pytest.raises(ValueError, match="layers"):
        LoRASingularValues(model, rank=1, layers=["nope"])
    with pytest.raises(ValueError, match="basis"):
        LoRASingularValues(model, rank=1, basis="svd")
