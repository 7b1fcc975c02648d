"""Shared pieces of the guide tests: affine pushes, two-model conditioning, seeded noise."""

from __future__ import annotations

import torch

import gradkit.guide as G

f64 = torch.float64


def noise(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, dtype=f64, generator=torch.Generator().manual_seed(seed))


def affine_map(fn, d: int):
    """``(A, b)`` of an affine map ``x ↦ A x + b`` on R^d, from d + 1 evaluations (rows are samples)."""
    pts = torch.cat([torch.zeros(1, d, dtype=f64), torch.eye(d, dtype=f64)])
    out = fn(pts)
    b = out[0]
    A = (out[1:] - b).T
    return A, b


def endpoint_law(fn, d: int):
    """Mean and covariance of ``fn(x0)`` for ``x0 ~ N(0, I)`` when ``fn`` is affine: ``(b, A Aᵀ)``."""
    A, b = affine_map(fn, d)
    return b, A @ A.T


class TwoModels:
    """``cond=None`` → the unconditional model, otherwise the conditional one (both exact GMMs)."""

    prediction = "velocity"

    def __init__(self, cond_model, uncond_model):
        self.c, self.u = cond_model, uncond_model

    def __call__(self, x, t, cond=None):
        return self.u(x, t) if cond is None else self.c(x, t)


def sym_sqrt(S: torch.Tensor) -> torch.Tensor:
    lam, U = torch.linalg.eigh(S)
    return U @ torch.diag(lam.sqrt()) @ U.T


def gauss_legendre(f, a: float, b: float, n: int = 200) -> float:
    import numpy as np

    xs, ws = np.polynomial.legendre.leggauss(n)
    s = 0.5 * (b - a) * xs + 0.5 * (a + b)
    return float(0.5 * (b - a) * np.sum(ws * f(s)))


def run(model, x, **kw):
    return G.sample(model, x, **kw)
