"""Gradient statistics: global and per-tensor norms, cosine to the previous gradient, gradient noise scale.

The noise scale is the "simple" noise scale of "An Empirical Model of Large-Batch Training" (McCandlish et al.,
2018), B_simple = tr(Σ)/‖G‖², estimated from consecutive gradients g_t, g_{t−1} of batch size B:
E[g_t·g_{t−1}] ≈ ‖G‖² and E[½‖g_t − g_{t−1}‖²] ≈ tr(Σ)/B (when G moves slowly), each smoothed by an EMA.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .._kernels import group_by_device_dtype, sq_norms
from .._validate import check_beta, check_int
from .base import Transform

__all__ = ["GradStats"]


class GradStats(Transform):
    """Measure the gradient without changing it.

    Per call: ``grad_norm`` (global 2-norm), ``norms`` (1-d tensor of per-tensor 2-norms, in parameter order),
    ``cosine`` to the previous call's gradient (NaN on the first call), and, from the second call on,
    ``noise_scale``: ``batch_size``·EMA(½‖g_t − g_{t−1}‖²)/EMA(g_t·g_{t−1}) (in examples), or in units of the
    batch when ``batch_size`` is None. It is NaN while the EMA of g_t·g_{t−1} is not positive (signal below noise).
    Assumes the gradients are unbiased, independent mini-batch estimates; the per-step drift of the true
    gradient inflates the noise term, so read it as an upper estimate when the learning rate is large.
    All norms and dot products come from foreach norms: ‖g‖², ‖g_prev‖², ‖g − g_prev‖² (one pass each).
    Keeps one copy of the previous gradient. Values are 0-d tensors (no host synchronisation).

    Args:
        batch_size: B, the mini-batch size, to express the noise scale in examples (None: in batches). Default None.
        beta: the EMA decay of the signal and noise estimates. Default 0.9.
    """

    paper = "An Empirical Model of Large-Batch Training"
    keeps_finite = True

    def __init__(self, batch_size: int | None = None, beta: float = 0.9):
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size, 1)
        self.beta = check_beta("beta", beta)
        self._prev: list[torch.Tensor] | None = None
        self._signal: torch.Tensor | None = None  # EMA of g_t·g_{t-1}
        self._noise: torch.Tensor | None = None  # EMA of ½‖g_t − g_{t−1}‖²
        self._count = 0

    @torch.no_grad()
    def __call__(self, params: Iterable[torch.Tensor]) -> dict[str, Any]:
        params = list(params)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return {}
        device = grads[0].device
        sq = torch.stack([s.to(device) for s in sq_norms(grads)])
        out: dict[str, Any] = {"grad_norm": sq.sum().sqrt(), "norms": sq.sqrt()}
        nan = torch.tensor(math.nan, device=device)
        prev = self._prev
        if prev is not None and len(prev) == len(grads) and all(a.shape == b.shape for a, b in zip(prev, grads)):
            diffs: list[torch.Tensor] = []
            for g_group, p_group in group_by_device_dtype([grads, prev]):
                diffs.extend(torch._foreach_sub(g_group, p_group))
            d2 = torch.stack([s.to(device) for s in sq_norms(diffs)]).sum()
            g2 = sq.sum()
            p2 = torch.stack([s.to(device) for s in sq_norms(prev)]).sum()
            dot = (g2 + p2 - d2) / 2
            out["cosine"] = dot / (g2 * p2).sqrt().clamp_min(1e-30)
            half_d2 = d2 / 2
            if self._signal is None:
                self._signal, self._noise = dot, half_d2
            else:
                self._signal = self.beta * self._signal + (1 - self.beta) * dot
                self._noise = self.beta * self._noise + (1 - self.beta) * half_d2
            scale = self._noise / self._signal * (self.batch_size or 1)
            out["noise_scale"] = torch.where(self._signal > 0, scale, nan)
        else:
            out["cosine"] = nan
        self._prev = [g.detach().clone() for g in grads]
        self._count += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"prev": None if self._prev is None else [t.clone() for t in self._prev],
                "signal": self._signal, "noise": self._noise, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._prev = None if state["prev"] is None else [t.clone() for t in state["prev"]]
        self._signal, self._noise, self._count = state["signal"], state["noise"], int(state["count"])

    def __repr__(self) -> str:
        return f"GradStats(batch_size={self.batch_size}, beta={self.beta})"
