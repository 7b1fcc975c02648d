"""The model contract of :mod:`gradkit.guide`: any callable ``(x, t, cond) -> prediction`` with a declared
parameterisation, seen by the sampler as a velocity on the linear path ``x_t = (1−t)·x0 + t·x1``.

A plain callable (or module) is taken to predict the velocity, unless it carries a ``prediction`` attribute
(``"velocity"``, ``"x1"`` data, ``"x0"`` noise, ``"score"``, ``"epsilon"`` for VP ε-models, ``"diffusers_flow"``
for ``u = −v`` at ``σ = 1 − t``). :class:`FlowModel` declares it explicitly and maps the path time to whatever
time input the network expects. ``cond=None`` means unconditional: the network decides what that is (a null label,
an empty-prompt embedding, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._validate import check_choice
from . import _convert as C

Tensor = torch.Tensor

__all__ = ["FlowModel", "as_flow_model", "vp_cosine_time", "vp_discrete_time"]


class FlowModel:
    """A network with a declared prediction type, called as ``model(x, t, cond) -> velocity``.

    Args:
        fn: the network, ``fn(x_in, time_in, cond) -> prediction`` (``cond`` is passed through unchanged: a label
            tensor, a dict of embeddings, ``None`` for unconditional).
        prediction: what ``fn`` returns (default ``"velocity"``): ``"velocity"`` v, ``"x1"`` the data prediction
            x̂1, ``"x0"`` the noise prediction x̂0, ``"score"`` ∇log p_t, ``"epsilon"`` the ε of a
            variance-preserving model (``z = α·x1 + σ·ε``, α² + σ² = 1; ``fn`` then receives the VP state
            ``z = (α+σ)·x``), ``"diffusers_flow"`` u = −v.
        time_fn: maps the path time t (a ``[B]`` tensor) to ``fn``'s time input (default: t itself; for
            ``"epsilon"`` see :func:`vp_cosine_time` / :func:`vp_discrete_time`; for diffusers flow models
            ``lambda t: (1 − t)·1000``).

    ``prediction="epsilon"`` is singular at t = 0 (``v = (x − ε)/t``), ``"x1"`` and ``"score"`` at t = 1: the
    sampler never evaluates there unless a method asks for it (Heun/RK4 end at t = 1; use Euler or a grid that
    stops short of 1 for such models).
    """

    def __init__(self, fn: Callable[..., Tensor], prediction: str = "velocity", *,
                 time_fn: Callable[[Tensor], Any] | None = None):
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.prediction = check_choice("prediction", prediction, C.PREDICTIONS)
        self.time_fn = time_fn

    def raw(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """The network's own output at the path point ``(x, t)`` (no conversion)."""
        x_in = C.vp_from_path(x, t) if self.prediction == "epsilon" else x
        t_in = self.time_fn(t) if self.time_fn is not None else t
        return self.fn(x_in, t_in, cond)

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return C.from_prediction(self.prediction, self.raw(x, t, cond), x, t)

    def __repr__(self) -> str:
        return f"FlowModel({getattr(self.fn, '__name__', type(self.fn).__name__)}, prediction={self.prediction!r})"


def as_flow_model(model: Any) -> FlowModel:
    """``model`` as a :class:`FlowModel` (its ``prediction`` attribute, else ``"velocity"``).

    Args:
        model: a :class:`FlowModel` (returned as is) or a callable ``(x, t, cond) -> prediction``.
    """
    if isinstance(model, FlowModel):
        return model
    if not callable(model):
        raise ValueError(f"model must be callable (x, t, cond) -> prediction, got {type(model).__name__}")
    return FlowModel(model, getattr(model, "prediction", "velocity"))


def vp_cosine_time(t: Tensor) -> Tensor:
    """Continuous time τ ∈ [0, 1] of the cosine VP schedule ``ᾱ(τ) = cos²(πτ/2)`` at path time t
    (τ = 1 is pure noise): ``τ = (2/π)·atan((1−t)/t)``.

    Args:
        t: path times (tensor).
    """
    return (2 / math.pi) * torch.atan2(1 - t, t)


def vp_discrete_time(alphas_cumprod: Tensor) -> Callable[[Tensor], Tensor]:
    """Time map for a discrete VP model trained on ``alphas_cumprod`` (index 0 = least noise): the fractional
    timestep whose log-SNR equals the path's ``log(t/(1−t))²``, interpolated linearly in log-SNR.

    Args:
        alphas_cumprod: the model's ᾱ table (e.g. ``scheduler.alphas_cumprod`` of a diffusers DDPM scheduler).
    """
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    logsnr = torch.log(ac) - torch.log1p(-ac)  # decreasing with the index

    def time_fn(t: Tensor) -> Tensor:
        tt = t.to(torch.float64)
        target = 2 * (torch.log(tt) - torch.log1p(-tt))
        # logsnr is decreasing: search on its negation
        neg = -logsnr
        idx = torch.searchsorted(neg, -target).clamp(1, len(ac) - 1)
        lo, hi = neg[idx - 1], neg[idx]
        frac = ((-target - lo) / (hi - lo)).clamp(0, 1)
        return ((idx - 1).to(torch.float64) + frac).to(t.dtype)

    return time_fn
