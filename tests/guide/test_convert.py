"""Conversions between velocity, data, noise and score predictions, and the model adapters (float64)."""

import math

import pytest
import torch

import gradkit.guide as G
from gradkit.guide import _convert as C

from .helpers import f64, noise


@pytest.mark.parametrize("t", [0.05, 0.3, 0.5, 0.77, 0.95])
def test_predictions_round_trip(t):
    x, v = noise(7, 3, 0), noise(7, 3, 1)
    for kind in ("velocity", "x1", "x0", "score", "epsilon", "diffusers_flow"):
        p = C.to_prediction(kind, v, x, t)
        assert torch.allclose(C.from_prediction(kind, p, x, t), v, atol=1e-12, rtol=0), kind
    # the path identity x = (1−t)·x̂0 + t·x̂1 holds for any velocity
    assert torch.allclose((1 - t) * C.x0_from_v(x, v, t) + t * C.x1_from_v(x, v, t), x, atol=1e-13)


def test_per_row_times_broadcast():
    x, v = noise(4, 2, 0), noise(4, 2, 1)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=f64)
    out = C.score_from_v(x, v, t)
    for i in range(4):
        assert torch.allclose(out[i], C.score_from_v(x[i:i + 1], v[i:i + 1], float(t[i]))[0], atol=1e-14)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_gmm_score_velocity_x1_consistent(t):
    g = G.toy.asymmetric()
    x = noise(6, 2, 3)
    v, s = g(x, t), g.score(x, t)
    assert torch.allclose(v, C.v_from_score(x, s, t), atol=1e-13)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(g.log_prob(xr, t).sum(), xr)
    assert torch.allclose(grad, s, atol=1e-12)
    assert torch.allclose(g.x1_hat(x, t), C.x1_from_v(x, v, t), atol=1e-13)


def _gmm_eps_fn(g):
    """A VP ε-model from the exact GMM on the cosine schedule: fn(z, τ, cond) = ε̂."""

    def fn(z, tau, cond=None):
        a, s = torch.cos(math.pi * tau / 2), torch.sin(math.pi * tau / 2)
        x, t = C.path_from_vp(z, a, s)
        return C.x0_from_v(x, g(x, t, cond), C.bcast(t, x))

    return fn


@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_vp_epsilon_model_maps_to_path_velocity(t):
    g = G.toy.ring(4, classes="parity")
    m = G.FlowModel(_gmm_eps_fn(g), "epsilon", time_fn=G.vp_cosine_time)
    x = noise(5, 2, 4)
    tt = torch.full((5,), t, dtype=f64)
    for cond in (None, torch.tensor([0, 1, 0, 1, 1])):
        assert torch.allclose(m(x, tt, cond), g(x, t, cond), atol=1e-12)


def test_vp_discrete_time_inverts_the_table():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=f64)
    ac = torch.cumprod(1 - betas, 0)
    fn = G.vp_discrete_time(ac)
    for n in (10, 250, 731.5):
        lo = int(n)
        a_bar = ac[lo] if n == lo else torch.exp(torch.lerp(torch.log(ac[lo] / (1 - ac[lo])),
                                                            torch.log(ac[lo + 1] / (1 - ac[lo + 1])), n - lo))
        a_bar = a_bar / (1 + a_bar) if n != lo else a_bar
        alpha, sigma = a_bar.sqrt(), (1 - a_bar).sqrt()
        t = alpha / (alpha + sigma)
        assert abs(float(fn(t.reshape(1))) - n) < 1e-9


def test_diffusers_flow_convention():
    # diffusers: z = (1−σ)·data + σ·noise, network u = noise − data; σ = 1 − t and u = −v on our path
    data, nz = noise(3, 2, 0), noise(3, 2, 1)
    sigma = 0.3
    z = (1 - sigma) * data + sigma * nz
    t = C.t_from_diffusers_sigma(sigma)
    assert torch.allclose(z, (1 - t) * nz + t * data)
    u = nz - data
    m = G.FlowModel(lambda x, tt, c: u, "diffusers_flow", time_fn=lambda tt: (1 - tt) * 1000)
    assert torch.allclose(m(z, torch.full((3,), t, dtype=f64)), data - nz)
    # one scheduler step x ← x + (σ′ − σ)·u is one Euler step of dt = t′ − t on v
    s2 = 0.2
    assert torch.allclose(z + (s2 - sigma) * u, z + ((1 - s2) - t) * (data - nz))


def test_flow_model_declarations_and_errors():
    f = lambda x, t, c: x  # noqa: E731
    assert G.as_flow_model(f).prediction == "velocity"
    f.prediction = "x1"
    assert G.as_flow_model(f).prediction == "x1"
    with pytest.raises(ValueError, match="prediction"):
        G.FlowModel(f, "noise")
    with pytest.raises(ValueError, match="callable"):
        G.as_flow_model(3)
    m = G.FlowModel(lambda x, t, c: x * c["scale"])  # the condition is passed through unchanged
    assert torch.equal(m(torch.ones(2, 1), torch.zeros(2), {"scale": 2.0}), torch.full((2, 1), 2.0))
