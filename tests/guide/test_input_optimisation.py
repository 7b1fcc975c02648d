"""Input optimisation on exact flows: D-Flow reaches Σ^{-1/2}(y − m) (exact flow) and A_h⁻¹(y − b_h) (the discrete
solver) to 1e-8 and Φ⁻¹(y) on a mixture; FlowOpt converges just below its step-size bound and diverges just above,
and estimates the bound; noise search by SPSA / ES / ForwardGradient (gk.Pipeline) and CMA-ES (gk.search) reaches
the same optimum within a stated budget."""

import functools
import warnings

import pytest
import torch

import gradkit as gk
import gradkit.guide as G
from gradkit.errors import NonFiniteError

from .helpers import affine_map, sym_sqrt

f64 = torch.float64
M = torch.tensor([1.0, -2.0], dtype=f64)
S = torch.tensor([[1.2, 0.2], [0.2, 0.9]], dtype=f64)          # full covariance, well conditioned
GAUSS = G.toy.gaussian(M, S)
Y = torch.tensor([[0.3, 0.7], [2.0, -1.0]], dtype=f64)


def sq(y):
    def loss(x):
        return 0.5 * ((x - y) ** 2).sum(1)
    return loss


def discrete_optimum(steps, method, y=Y):
    A, b = affine_map(lambda x: G.sample(GAUSS, x, steps=steps, method=method), 2)
    return torch.linalg.solve(A, (y - b).T).T, A


# ------------------------------------------------------------------ D-Flow
def test_dflow_exact_flow_reaches_sigma_inverse_sqrt_of_y_minus_m():
    x_star = torch.linalg.solve(sym_sqrt(S), (Y - M).T).T
    d = G.DFlow(sq(Y), iters=12, flow=lambda x0: GAUSS.flow_map(x0))
    out = d.run(None, torch.zeros(2, 2, dtype=f64))
    assert (out.x0 - x_star).abs().max() < 1e-8
    assert out.history[-1] < 1e-15 < out.history[0]


@pytest.mark.parametrize("method,steps", [("euler", 6), ("midpoint", 6)])
def test_dflow_through_the_discrete_solver_reaches_its_affine_optimum(method, steps):
    x_h, _ = discrete_optimum(steps, method)
    out = G.DFlow(sq(Y), steps=steps, method=method, iters=12).run(GAUSS, torch.zeros(2, 2, dtype=f64))
    assert (out.x0 - x_h).abs().max() < 1e-8
    assert out.info["backward"] >= out.info["iterations"]
    assert out.nfe > 0


def test_dflow_adjoint_matches_backprop_for_a_linear_flow():
    # for an affine vector field the discrete adjoint of Euler equals backpropagation through Euler
    pytest.importorskip("torchdiffeq", reason="the adjoint backend is torchdiffeq")
    x_h, _ = discrete_optimum(6, "euler")
    out = G.DFlow(sq(Y), steps=6, method="euler", iters=12, adjoint=True).run(GAUSS, torch.zeros(2, 2, dtype=f64))
    assert (out.x0 - x_h).abs().max() < 1e-8


def test_dflow_on_a_mixture_inverts_the_flow():
    gmm = G.toy.asymmetric()
    y = torch.tensor([[-0.8, 0.4], [1.7, -1.2]], dtype=f64)
    steps = 8
    out = G.DFlow(sq(y), steps=steps, method="rk4", iters=25, tol=1e-14).run(gmm, torch.zeros(2, 2, dtype=f64))
    # the discrete map's own preimage: Φ_h(x0) = y to 1e-9, and the backward RK4 solve agrees to its round trip
    assert (G.sample(gmm, out.x0, steps=steps, method="rk4") - y).abs().max() < 1e-9
    back = gmm.flow_map(y, 1.0, 0.0, steps=steps)
    trip = (gmm.flow_map(back, 0.0, 1.0, steps=steps) - y).abs().max()
    assert (out.x0 - back).abs().max() < 10 * float(trip) + 1e-9


def test_dflow_chi_regulariser_and_optimizer_factory():
    x0 = torch.full((1, 5), 3.0, dtype=f64)
    d = G.DFlow(lambda x: torch.zeros(x.shape[0], dtype=x.dtype), reg="chi", iters=30,
                flow=lambda z: z)                         # only the shell term: ‖x0‖ → √(d − 1)
    out = d.run(None, x0)
    assert abs(float(out.x0.norm()) - 2.0) < 1e-6
    d = G.DFlow(sq(Y[:1]), iters=150, flow=lambda z: GAUSS.flow_map(z),
                optimizer=lambda p: gk.optim.AdamW(p, lr=0.05, weight_decay=0.0, kernel="foreach"))
    out = d.run(None, torch.zeros(1, 2, dtype=f64))
    assert out.history[-1] < 1e-4 * out.history[0]


def test_dflow_bad_arguments_and_nonfinite():
    with pytest.raises(ValueError, match="optimizer"):
        G.DFlow(sq(Y), optimizer="adam")
    with pytest.raises(ValueError, match="adjoint"):
        G.DFlow(sq(Y), method="heun", adjoint=True)
    with pytest.raises(ValueError, match="reg"):
        G.DFlow(sq(Y), reg="l1")
    d = G.DFlow(lambda x: torch.full((x.shape[0],), float("nan"), dtype=x.dtype), flow=lambda z: z, iters=2)
    with pytest.raises(NonFiniteError):
        d.run(None, torch.zeros(1, 2, dtype=f64))


# ------------------------------------------------------------------ FlowOpt
def _flowopt_jacobian(fo):
    A, _ = affine_map(lambda z: fo.flow(GAUSS, z), 2)
    return A


def test_flowopt_converges_below_its_bound_and_diverges_above():
    fo = G.FlowOpt(Y, steps=10, n_max=4, check="off", power_iters=200)
    A = _flowopt_jacobian(fo)
    assert torch.allclose(A, A.T, atol=1e-14)                # a function of Σ: symmetric positive definite
    bound = 2.0 / float(torch.linalg.eigvalsh(A).max())
    est = fo.bound(GAUSS, torch.zeros(2, 2, dtype=f64))
    assert torch.allclose(est["eta_bound"], torch.full((2,), bound, dtype=f64), rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        below = G.FlowOpt(Y, eta=0.9 * bound, iters=120, steps=10, n_max=4).run(GAUSS)
    assert float(below.info["residual"][-1].max()) < 1e-8
    rho = float(below.info["contraction"].max())
    lam = torch.linalg.eigvalsh(A)
    assert rho == pytest.approx(float((1 - 0.9 * bound * lam).abs().max()), rel=1e-4)
    with pytest.warns(RuntimeWarning, match="step-size bound"):
        above = G.FlowOpt(Y, eta=1.1 * bound, iters=120, steps=10, n_max=4).run(GAUSS)
    res = above.info["residual"]
    assert float(res[-1].min()) > 1e3 * float(res[0].max())
    with pytest.raises(ValueError, match="bound"):
        G.FlowOpt(Y, eta=1.1 * bound, steps=10, n_max=4, check="raise").run(GAUSS)


def test_flowopt_inversion_start_and_loss_mode():
    fo = G.FlowOpt(Y, eta=0.5, iters=0, steps=10, n_max=4, check="off")
    z = fo.invert(GAUSS, Y)
    # the backward Euler solve (4 steps) is not the exact inverse of the forward one: a first-order residual
    # remains, which the iteration then removes
    assert 1e-3 < float((fo.flow(GAUSS, z) - Y).abs().max()) < 0.5
    lo = G.FlowOpt(loss=sq(Y), eta=0.5, iters=60, steps=10, n_max=4, check="off").run(GAUSS, z)
    assert float((lo.x1 - Y).abs().max()) < 1e-8
    with pytest.raises(ValueError, match="exactly one"):
        G.FlowOpt()
    with pytest.raises(ValueError, match="n_max"):
        G.FlowOpt(Y, steps=3, n_max=4)
    with pytest.raises(ValueError, match="z0 is required"):
        G.FlowOpt(loss=sq(Y), check="off").run(GAUSS)


# ------------------------------------------------------------------ noise search
STEPS = 6


@pytest.mark.parametrize("name,source,optimizer,iters", [
    ("backprop", None, lambda p: torch.optim.SGD(p, lr=0.8), 40),
    ("spsa", functools.partial(gk.sources.SPSA, eps=1e-5, n_directions=4, seed=0),
     lambda p: torch.optim.SGD(p, lr=0.5), 60),
    ("es", functools.partial(gk.sources.ES, sigma=1e-3, population=8, seed=0, rank_shaping=False),
     lambda p: torch.optim.SGD(p, lr=0.5), 60),
    ("forward_gradient", functools.partial(gk.sources.ForwardGradient, seed=0),
     lambda p: torch.optim.SGD(p, lr=0.5), 60),
])
def test_noise_search_with_a_pipeline_reaches_the_optimum(name, source, optimizer, iters):
    y = Y[:1]
    x_h, _ = discrete_optimum(STEPS, "euler", y)
    ns = G.NoiseSearch(sq(y), steps=STEPS)
    out = ns.optimize(GAUSS, torch.zeros(1, 2, dtype=f64), source=source, optimizer=optimizer, iters=iters)
    tol = 1e-4 if name == "forward_gradient" else 1e-6     # one random direction per step: noisier
    assert (out.x0 - x_h).abs().max() < tol, (name, out.x0, x_h)


@pytest.mark.parametrize("method", ["cmaes", "snes"])
def test_noise_search_with_a_searcher_reaches_the_optimum(method):
    y = Y[:1]
    x_h, _ = discrete_optimum(STEPS, "euler", y)
    ns = G.NoiseSearch(sq(y), steps=STEPS)
    opts = {"tolfun": 1e-22, "tolx": 1e-14} if method == "cmaes" else {}
    out = ns.search(GAUSS, torch.zeros(1, 2, dtype=f64), method=method, sigma0=1.0, budget=800, seed=0, **opts)
    assert (out.x0 - x_h).abs().max() < (1e-8 if method == "cmaes" else 1e-5)
    assert out.evaluations <= 800


def test_noise_search_in_a_subspace():
    # a 1-D subspace through x̄0: the optimum is the projection of the full optimum (Φ is affine)
    y = Y[:1]
    x_h, A = discrete_optimum(STEPS, "euler", y)
    ns = G.NoiseSearch(sq(y), steps=STEPS, subspace=1, basis_seed=3)
    x_bar = torch.zeros(1, 2, dtype=f64)
    U = ns.basis(2)
    out = ns.search(GAUSS, x_bar, sigma0=1.0, budget=300, seed=1, tolfun=1e-22, tolx=1e-14)
    # least squares in z: minimise ‖A U z + b − y‖ with b = Φ(0)
    b = G.sample(GAUSS, x_bar, steps=STEPS)
    z = torch.linalg.lstsq(A @ U, (y - b).T).solution
    assert (out.x0 - (U @ z).T).abs().max() < 1e-7
    assert abs(float(U.T @ U) - 1.0) < 1e-12


def test_noise_search_nonfinite():
    ns = G.NoiseSearch(lambda x: torch.where(x[:, 0] > 0, torch.nan, x[:, 0] ** 2 + x[:, 1] ** 2), steps=2)
    with pytest.raises(NonFiniteError):
        ns.search(GAUSS, torch.zeros(1, 2, dtype=f64), budget=50, seed=0)
    ns = G.NoiseSearch(lambda x: torch.where(x[:, 0] > 0, torch.nan, x[:, 0] ** 2 + x[:, 1] ** 2), steps=2,
                       on_nonfinite="worst")
    out = ns.search(GAUSS, torch.zeros(1, 2, dtype=f64), budget=100, seed=0)
    assert bool(torch.isfinite(out.loss).all())
    with pytest.raises(ValueError, match="skip"):
        G.NoiseSearch(sq(Y), on_nonfinite="skip")
    with pytest.raises(ValueError, match="subspace"):
        G.NoiseSearch(sq(Y), subspace=0)
