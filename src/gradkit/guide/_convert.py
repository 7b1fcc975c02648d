"""Conversions between predictions on the linear path, and from other conventions onto it (private).

The path: ``x_t = (1−t)·x0 + t·x1`` with ``x0 ~ N(0, I)`` (noise) and ``x1`` data; t runs from 0 (noise) to 1
(data) and the velocity is ``v(x, t) = E[x1 − x0 | x_t = x]``. For this path, exactly:

    x̂1 = x + (1−t)·v        (data prediction)          v = (x̂1 − x)/(1−t)
    x̂0 = x − t·v            (noise prediction)         v = (x − x̂0)/t
    s  = (t·v − x)/(1−t)    (score ∇ log p_t)           v = (x + (1−t)·s)/t

Variance-preserving ε-models (``z = α·x1 + σ·ε``, α² + σ² = 1) sit on the same path after the change of variables
``t = α/(α+σ)``, ``x = z/(α+σ)``; their ε is the path's noise prediction x̂0.

diffusers' flow-matching pipelines (SD3, Flux, Wan) use ``σ = 1 − t``, ``z = (1−σ)·data + σ·noise`` and a network
that returns ``u = noise − data = −v``.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

__all__ = ["PREDICTIONS", "bcast", "diffusers_sigma_from_t", "from_prediction", "path_from_vp", "score_from_v",
           "t_from_diffusers_sigma", "to_prediction", "v_from_score", "v_from_x0", "v_from_x1", "vp_alpha_sigma",
           "vp_from_path", "x0_from_v", "x1_from_v"]

PREDICTIONS = ("velocity", "x1", "x0", "score", "epsilon", "diffusers_flow")


def bcast(t: Tensor | float, x: Tensor) -> Tensor | float:
    """``t`` (a scalar or a ``[B]`` tensor) shaped to broadcast against ``x`` of shape ``[B, ...]``."""
    if isinstance(t, Tensor) and t.ndim == 1 and x.ndim > 1:
        return t.reshape(-1, *([1] * (x.ndim - 1)))
    return t


def x1_from_v(x: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    return x + (1 - bcast(t, x)) * v


def x0_from_v(x: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    return x - bcast(t, x) * v


def score_from_v(x: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    tb = bcast(t, x)
    return (tb * v - x) / (1 - tb)


def v_from_x1(x: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
    return (x1 - x) / (1 - bcast(t, x))


def v_from_x0(x: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
    return (x - x0) / bcast(t, x)


def v_from_score(x: Tensor, s: Tensor, t: Tensor | float) -> Tensor:
    tb = bcast(t, x)
    return (x + (1 - tb) * s) / tb


def vp_alpha_sigma(t: Tensor | float) -> tuple:
    """(α, σ) of the variance-preserving point with ``α/(α+σ) = t``: ``α = t/n``, ``σ = (1−t)/n``,
    ``n = √(t² + (1−t)²)``."""
    n = (t * t + (1 - t) * (1 - t)) ** 0.5 if isinstance(t, Tensor) else math.sqrt(t * t + (1 - t) ** 2)
    return t / n, (1 - t) / n


def vp_from_path(x: Tensor, t: Tensor | float) -> Tensor:
    """The VP state ``z = (α+σ)·x`` of the path point ``x`` at time t (``α² + σ² = 1``)."""
    a, s = vp_alpha_sigma(t)
    return x * bcast(a + s, x)


def path_from_vp(z: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> tuple:
    """``(x, t)`` on the linear path of the VP state ``z = α·x1 + σ·ε``."""
    return z / bcast(alpha + sigma, z), alpha / (alpha + sigma)


def t_from_diffusers_sigma(sigma: Tensor | float) -> Tensor | float:
    return 1 - sigma


def diffusers_sigma_from_t(t: Tensor | float) -> Tensor | float:
    return 1 - t


def from_prediction(kind: str, pred: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
    """The velocity from a prediction of the given kind at the path point ``(x, t)``.

    ``"epsilon"`` is the noise prediction of a VP model, i.e. the path's x̂0 (the caller evaluates the network at
    the VP state ``vp_from_path(x, t)``). ``"diffusers_flow"`` is ``u = −v``.
    """
    if kind == "velocity":
        return pred
    if kind == "diffusers_flow":
        return -pred
    if kind == "x1":
        return v_from_x1(x, pred, t)
    if kind in ("x0", "epsilon"):
        return v_from_x0(x, pred, t)
    if kind == "score":
        return v_from_score(x, pred, t)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {kind!r}")


def to_prediction(kind: str, v: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
    """Inverse of :func:`from_prediction`: the prediction of the given kind from a velocity."""
    if kind == "velocity":
        return v
    if kind == "diffusers_flow":
        return -v
    if kind == "x1":
        return x1_from_v(x, v, t)
    if kind in ("x0", "epsilon"):
        return x0_from_v(x, v, t)
    if kind == "score":
        return score_from_v(x, v, t)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {kind!r}")
