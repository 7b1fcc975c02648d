"""The sampler: reproduces the mixture, solver orders, SDE marginals, NFE, trajectory, seeding, resume, errors."""

import copy
import math
import pickle

import pytest
import torch

import gradkit as gk
import gradkit.guide as G

from .helpers import endpoint_law, f64, noise


def _check_mixture(g, x, k_sigma=4.5):
    n = x.shape[0]
    se = (g.cov().diagonal() / n).sqrt()
    assert bool(((x.mean(0) - g.mean()).abs() < k_sigma * se).all()), (x.mean(0), g.mean())
    second = (x[:, :, None] * x[:, None, :]).reshape(n, -1)
    ref = g.cov() + g.mean()[:, None] * g.mean()[None, :]
    se2 = second.std(0) / math.sqrt(n)
    assert bool(((second.mean(0) - ref.flatten()).abs() < k_sigma * se2).all())
    frac = torch.bincount(g.responsibilities(x, 1.0).argmax(1), minlength=g.num_components).double() / n
    p = g.component_weights()
    assert bool(((frac - p).abs() < k_sigma * (p * (1 - p) / n).sqrt()).all()), frac


def test_sample_with_exact_velocity_reproduces_the_mixture():
    g = G.toy.ring(8)
    _check_mixture(g, G.sample(g, noise(2000, 2, 0), method="rk4", steps=30))


def test_sde_sampler_keeps_the_marginals():
    g = G.toy.ring(8)
    _check_mixture(g, G.sample(g, noise(2000, 2, 1), method="sde", steps=150, g=1.5, seed=3))


def test_class_conditional_sampling_hits_the_sub_mixture():
    g = G.toy.ring(8, classes="parity")
    x = G.sample(g, noise(1000, 2, 2), cond=1, method="rk4", steps=30)
    comp = g.responsibilities(x, 1.0).argmax(1)
    assert bool((comp % 2 == 1).all())
    _check_mixture(g.subset(1), x)


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_solver_orders_on_gaussian_data(method, order):
    g = G.toy.gaussian([1.0, -0.5], [[0.5, 0.2], [0.2, 0.3]])
    errs = []
    for n in (64, 128):
        m, S = endpoint_law(lambda z, n=n: G.sample(g, z, method=method, steps=n), 2)
        errs.append(float((m - g.means[0]).abs().max() + (S - g.covs[0]).abs().max()))
    ratio = errs[0] / errs[1]
    # at least the method's order (the midpoint rule happens to be third order on this linear family)
    assert ratio > 2 ** order * 0.85, (errs, ratio)
    if method != "midpoint":
        assert ratio < 2 ** order * 1.15, (errs, ratio)


def test_nfe_trajectory_and_grid():
    g = G.toy.ring(4)
    out = G.sample(g, noise(5, 2), steps=7, method="heun", trajectory=True, full_output=True)
    assert out.nfe == 14 and out.calls == 14
    assert out.trajectory.shape == (8, 5, 2) and torch.equal(out.trajectory[-1], out.x)
    assert torch.equal(out.times, torch.linspace(0, 1, 8, dtype=f64))
    out = G.sample(g, noise(5, 2), guidance=G.CFG(2.0), cond=0, steps=5, method="rk4", full_output=True)
    assert out.nfe == 40
    times = [0.0, 0.1, 0.5, 1.0]
    assert G.sample(g, noise(5, 2), times=times, full_output=True).nfe == 3


def test_seeded_sde_is_reproducible_and_seed_matters():
    g = G.toy.ring(4)
    a = G.sample(g, noise(6, 2), method="sde", steps=20, seed=4)
    b = G.sample(g, noise(6, 2), method="sde", steps=20, seed=4)
    c = G.sample(g, noise(6, 2), method="sde", steps=20, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("method", ["sde", "rk4"])
def test_resume_from_state_dict_is_bit_identical(method):
    g = G.toy.ring(6, classes="parity")
    cond = torch.tensor([0, 1, 0, 1])
    mk = lambda: G.Sampler(g, guidance=G.APG(4.0, momentum=-0.5), steps=20, method=method, seed=2)  # noqa: E731
    straight = mk().run(noise(4, 2), cond).x
    s = mk()
    s.start(noise(4, 2), cond)
    for _ in range(8):
        s.step()
    state = pickle.loads(pickle.dumps(copy.deepcopy(s.state_dict())))
    r = mk()
    r.load_state_dict(state)
    assert torch.equal(r.run().x, straight)


def test_inverse_flow_map_by_backward_integration():
    g = G.toy.asymmetric()
    x0 = noise(4, 2, 3)
    x1 = G.sample(g, x0, method="rk4", steps=80)
    back = G.sample(g, x1, method="rk4", steps=80, t_start=1.0, t_end=0.0)
    assert torch.allclose(back, x0, atol=1e-5)


def test_flow_map_function_round_trip_and_sde_refused():
    g = G.toy.asymmetric()
    x0 = noise(3, 2, 4)
    y = G.flow_map(g, x0, steps=60)
    assert torch.allclose(G.flow_map(g, y, 1.0, 0.0, steps=60), x0, atol=1e-5)
    with pytest.raises(ValueError, match="flow map"):
        G.flow_map(g, x0, method="sde")


def test_grad_through_the_solve():
    g = G.toy.gaussian([0.5, 0.0], [[1.0, 0.0], [0.0, 4.0]])
    x0 = noise(3, 2).requires_grad_(True)
    y = G.sample(g, x0, method="rk4", steps=50, grad=True)
    (gr,) = torch.autograd.grad(y[:, 1].sum(), x0)
    assert torch.allclose(gr, torch.tensor([[0.0, 2.0]] * 3, dtype=f64), atol=1e-7)


def test_nonfinite_state_raises_naming_the_step_or_is_ignored():
    def bad(x, t, c=None):
        return torch.where(t[:, None] > 0.45, torch.full_like(x, float("nan")), x)

    with pytest.raises(gk.NonFiniteError, match="step 5"):
        G.sample(bad, noise(2, 2), steps=10)
    assert torch.isnan(G.sample(bad, noise(2, 2), steps=10, on_nonfinite="ignore")).all()


def test_bad_arguments():
    g = G.toy.ring(4)
    with pytest.raises(ValueError, match="method"):
        G.sample(g, noise(2, 2), method="dopri5")
    with pytest.raises(ValueError, match="steps"):
        G.sample(g, noise(2, 2), steps=0)
    with pytest.raises(ValueError, match="monotone"):
        G.sample(g, noise(2, 2), times=[0.0, 0.5, 0.4, 1.0])
    with pytest.raises(ValueError, match="forward"):
        G.sample(g, noise(2, 2), method="sde", t_start=1.0, t_end=0.0)
    with pytest.raises(ValueError, match="on_nonfinite"):
        G.sample(g, noise(2, 2), on_nonfinite="skip")
    with pytest.raises(ValueError, match="guidance"):
        G.sample(g, noise(2, 2), guidance=lambda ctx: ctx.x)
    with pytest.raises(ValueError, match="supported"):
        G.sample(g, noise(2, 2), guidance=G.CFGPlusPlus(0.5), method="rk4")
    with pytest.raises(ValueError, match="g must"):
        G.sample(g, noise(2, 2), method="sde", g=-1.0)


def test_population_hook_resamples_rows_and_their_conditions():
    class KeepFirstOfEachPair(G.Guidance):  # a toy "population": every odd row is replaced by its even neighbour
        def after_step(self, ctx, x):
            idx = torch.arange(x.shape[0]) // 2 * 2
            return x[idx], idx

    g = G.toy.ring(6, classes="parity")
    x, cond = noise(4, 2, 1), torch.tensor([0, 1, 1, 0])
    s = G.Sampler(g, guidance=KeepFirstOfEachPair(), steps=3)
    out = s.run(x, cond).x
    assert torch.equal(s.cond, torch.tensor([0, 0, 1, 1]))
    assert torch.equal(out[0], out[1]) and torch.equal(out[2], out[3])
    ref = G.sample(g, x[[0, 2]], cond=cond[[0, 2]], steps=3)
    assert torch.allclose(out[[0, 2]], ref, atol=1e-14)
