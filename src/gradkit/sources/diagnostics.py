"""How close is a gradient estimate to backprop? Cosine, relative error and variance over repeated draws."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .._validate import check_int
from .backprop import Backprop
from .base import Closure, Source

__all__ = ["Comparison", "compare"]


@dataclass(frozen=True)
class Comparison:
    """Statistics of ``n`` estimates ``ĝ_i`` against the backprop gradient ``g`` (all parameters flattened).

    ``cosine``: cosine between the mean estimate and ``g``; ``mean_cosine``: mean cosine of single estimates
    (what one optimizer step sees); ``relative_error``: ``‖mean ĝ − g‖ / ‖g‖``; ``relative_error_single``: the
    root-mean-square of ``‖ĝ_i − g‖ / ‖g‖``; ``variance``: the trace of the estimates' covariance,
    ``Σ_i ‖ĝ_i − mean‖² / (n − 1)``; ``grad_norm``: ``‖g‖``.

    Args:
        cosine: the cosine between the mean estimate and the backprop gradient.
        mean_cosine: the mean cosine of single estimates.
        relative_error: ‖mean ĝ − g‖ / ‖g‖.
        relative_error_single: the root-mean-square of ‖ĝ_i − g‖ / ‖g‖.
        variance: the trace of the estimates' covariance.
        grad_norm: ‖g‖.
        n: the number of estimates.
    """

    cosine: float
    mean_cosine: float
    relative_error: float
    relative_error_single: float
    variance: float
    grad_norm: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double()
                      for p in params])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else math.nan


def compare(source: Source, closure: Closure, n: int = 32) -> Comparison:
    """Draw ``n`` estimates from ``source`` at the current parameters and compare them with backprop.

    The closure must be differentiable by backprop (the reference). Parameters, their ``.grad`` and the
    source's state (random stream, step counter) are as before the call, so it can run mid-training.

    Args:
        source: the source to assess.
        closure: the loss closure (differentiable by backprop).
        n: the number of estimates drawn (≥ 2). Default 32.
    """
    n = check_int("n", n, 2)
    if isinstance(source, torch.optim.Optimizer):
        raise ValueError(f"{type(source).__name__} updates the parameters itself and writes no gradient; compare "
                         "the equivalent general-mode source (e.g. SPSA with the same eps) instead")
    params = source.active_params()
    saved_grads = [p.grad for p in params]
    state = source.snapshot()
    try:
        Backprop(params).estimate(closure)
        g = _flat(params)
        total = torch.zeros_like(g)
        sq_sum, cos_sum, err_sq = 0.0, 0.0, 0.0
        gn = float(g.norm())
        for _ in range(n):
            source.estimate(closure)
            e = _flat(params)
            total += e
            sq_sum += float(e @ e)
            cos_sum += _cos(e, g)
            err_sq += float((e - g).norm()) ** 2
        mean = total / n
        var = max(sq_sum - n * float(mean @ mean), 0.0) / (n - 1)
        return Comparison(cosine=_cos(mean, g), mean_cosine=cos_sum / n,
                          relative_error=float((mean - g).norm()) / gn if gn > 0 else math.nan,
                          relative_error_single=math.sqrt(err_sq / n) / gn if gn > 0 else math.nan,
                          variance=var, grad_norm=gn, n=n)
    finally:
        source.restore(state)
        for p, gr in zip(params, saved_grads):
            p.grad = gr
