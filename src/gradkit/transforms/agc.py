"""Adaptive Gradient Clipping (AGC): clip each unit's gradient relative to that unit's weight norm.

Paper: "High-Performance Large-Scale Image Recognition Without Normalization" (Brock et al., 2021).
For every unit i (a row of a weight: all dims but the first; the whole tensor for 0-/1-d parameters):
if ‖G_i‖ > λ·max(‖W_i‖, ε) then G_i ← λ·max(‖W_i‖, ε)·G_i/‖G_i‖.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .._validate import check_positive
from ._norms import has_graph, replace_grads
from .base import Transform, grads_of

__all__ = ["AGC"]

# Lower bound on a unit's gradient norm before dividing by it (the value pytorch-optimizer uses).
_GRAD_EPS = 1e-6


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x_i‖ per output unit (dim 0), keeping dims for broadcasting; the full norm for 0-/1-d tensors."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


class AGC(Transform):
    """Unit-wise gradient clipping to ``clip`` times the unit's parameter norm (floored at ``eps``).

    Units are output rows: for a ``Linear`` weight ``(out, in)`` a row, for a conv weight ``(out, in, kh, kw)``
    one filter. This equals ``pytorch_optimizer``'s ``agc`` for 0/1/2/4-d parameters; for 3-d parameters (Conv1d)
    it reduces over every dimension but the first, as the paper's definition does, where pytorch-optimizer
    reduces over dim 1 only. The paper does not clip the final classifier layer: pass only the parameters to
    clip. Unit norms are per-row reductions, one kernel per tensor (a foreach norm cannot reduce along a dim).
    Returns ``{"clipped_units": count, "units": total}`` (0-d tensor, int).

    Args:
        clip: λ, the largest ratio of a unit's gradient norm to its weight norm. Default 0.01.
        eps: ε, the floor of a unit's weight norm (so zero-initialised units can move). Default 1e-3.
    """

    paper = "High-Performance Large-Scale Image Recognition Without Normalization"
    keeps_finite = True

    def __init__(self, clip: float = 0.01, eps: float = 1e-3):
        self.clip = check_positive("clip", clip)
        self.eps = check_positive("eps", eps)

    @torch.no_grad()
    def __call__(self, params: Iterable[torch.Tensor]) -> dict[str, Any]:
        ps, grads = grads_of(params)
        if not ps:
            return {}
        clipped = []
        units = 0
        graph = has_graph(grads)
        factors = []
        for p, g in zip(ps, grads):
            max_norm = unitwise_norm(p.detach()).clamp_min(self.eps).mul_(self.clip)
            g_norm = unitwise_norm(g.detach()).clamp_min(_GRAD_EPS)
            over = g_norm > max_norm
            # Where the unit is within bounds the factor is exactly 1, so g is untouched bit for bit.
            factor = torch.where(over, max_norm / g_norm, torch.ones_like(g_norm))
            if graph:
                factors.append(factor)
            else:
                g.mul_(factor)
            clipped.append(over.sum())
            units += over.numel()
        if graph:
            with torch.enable_grad():
                replace_grads(ps, [g * f for g, f in zip(grads, factors)])
        return {"clipped_units": torch.stack(clipped).sum(), "units": units}

    def __repr__(self) -> str:
        return f"AGC(clip={self.clip}, eps={self.eps})"
