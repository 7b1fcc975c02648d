"""Shared pieces of the input-optimisation methods (private): the flow map Φ as a function of the sampler's input,
per-sample objectives, and the result record."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._validate import check_choice, check_int
from .base import Guidance
from .sampler import METHODS, Sampler

Tensor = torch.Tensor
f64 = torch.float64


@dataclass
class InputOptResult:
    """What an input-optimisation method returns.

    Args:
        x0: the optimised input (``[B, ...]``; the source noise, or FlowOpt's intermediate latent).
        x1: the flow's output from it (``[B, ...]``).
        loss: ``[B]`` final per-sample objective (float64).
        history: per-iteration objective, summed over the batch (float64), starting with the initial point.
        nfe: network evaluations per sample spent (flow solves × steps × evaluations per step).
        evaluations: number of flow solves per sample (forward only; a backward pass is counted in
            ``info["backward"]``).
        info: method-specific extras (iterations, step-size bound, searcher results, ...).
    """

    x0: Tensor
    x1: Tensor
    loss: Tensor
    history: list[float]
    nfe: float
    evaluations: int
    info: dict[str, Any] = field(default_factory=dict)


class FlowMap:
    """Φ: the sampler's output as a function of its input, with NFE bookkeeping.

    Args:
        steps: number of steps (default 20).
        method: the ODE solver (default ``"euler"``; any :data:`~gradkit.guide.METHODS` but ``"sde"``).
        times: an explicit grid (default: uniform from ``t_start`` to ``t_end``).
        t_start, t_end: ends of the uniform grid (default 0 → 1).
        guidance: a rule-level :class:`~gradkit.guide.Guidance` inside Φ (default none: the conditional velocity).
    """

    def __init__(self, *, steps: int = 20, method: str = "euler", times: Sequence[float] | Tensor | None = None,
                 t_start: float = 0.0, t_end: float = 1.0, guidance: Guidance | None = None):
        self.steps = check_int("steps", steps, 1)
        self.method = check_choice("method", method, tuple(m for m in METHODS if m != "sde"))
        self.times = times
        self.t_start, self.t_end = t_start, t_end
        self.guidance = guidance
        self.nfe = 0.0
        self.evaluations = 0

    def __call__(self, model: Any, x: Tensor, cond: Any = None, *, grad: bool = False) -> Tensor:
        s = Sampler(model, guidance=self.guidance, steps=self.steps, method=self.method, times=self.times,
                    t_start=self.t_start, t_end=self.t_end, grad=grad)
        out = s.run(x, cond)
        self.nfe += out.nfe
        self.evaluations += 1
        return out.x


def per_sample(values: Any, batch: int, what: str = "loss") -> Tensor:
    """A ``[batch]`` tensor from an objective's output (a scalar is accepted for ``batch == 1``)."""
    v = torch.as_tensor(values)
    if v.ndim == 0 and batch == 1:
        v = v.reshape(1)
    v = v.reshape(-1) if v.ndim <= 1 else v
    if v.ndim != 1 or v.shape[0] != batch:
        raise ValueError(f"the {what} must return one value per sample ([{batch}]), got shape {tuple(v.shape)}")
    return v


def check_objective(name: str, fn: Any) -> Callable[[Tensor], Tensor]:
    if not callable(fn):
        raise ValueError(f"{name} must be callable x1 -> [B], got {type(fn).__name__}")
    return fn
