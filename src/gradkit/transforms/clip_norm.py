"""Gradient-norm and gradient-value clipping.

Paper: "On the difficulty of training Recurrent Neural Networks" (Pascanu, Mikolov, Bengio, 2013).
ClipNorm: g ← g · min(1, c / (‖g‖ + 1e-6)), ‖·‖ taken over all gradients together. ClipValue: g ← clamp(g, −c, c).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .._kernels import group_by_device_dtype
from .._validate import check_positive, check_range
from ._norms import NORM_EPS, global_norm, has_graph, measure, replace_grads, scale_grads
from .base import Transform, grads_of

__all__ = ["ClipNorm", "ClipValue"]


class ClipNorm(Transform):
    """Rescale all gradients together so that their global ``norm_type``-norm is at most ``max_norm``.

    Numerically the same as ``torch.nn.utils.clip_grad_norm_`` (same ``1e-6`` guard, no host synchronisation).
    Returns ``{"grad_norm": norm before clipping, "clip_coef": applied factor ≤ 1}`` as 0-d tensors.

    Args:
        max_norm: c, the largest global norm the gradients may have after clipping (> 0).
        norm_type: the order of the norm (≥ 1, or inf). Default 2.0.
    """

    paper = "On the difficulty of training Recurrent Neural Networks"
    keeps_finite = True

    def __init__(self, max_norm: float, norm_type: float = 2.0):
        self.max_norm = check_positive("max_norm", max_norm)
        nt = float(norm_type) if not isinstance(norm_type, bool) else norm_type
        if not (isinstance(nt, float) and (math.isinf(nt) and nt > 0 or nt >= 1.0)):
            raise ValueError(f"norm_type must be >= 1 or inf, got {norm_type!r}")
        self.norm_type = nt

    def __call__(self, params: Iterable[torch.Tensor]) -> dict[str, Any]:
        measured = measure(params, self.norm_type)
        if measured is None:
            return {}
        ps, grads, norm = measured
        coef = (self.max_norm / (norm + NORM_EPS)).clamp(max=1.0)
        scale_grads(ps, grads, coef)
        return {"grad_norm": norm, "clip_coef": coef}

    def __repr__(self) -> str:
        return f"ClipNorm(max_norm={self.max_norm}, norm_type={self.norm_type})"


class ClipValue(Transform):
    """Clamp every gradient element to ``[-clip_value, clip_value]`` (as ``torch.nn.utils.clip_grad_value_``).

    Returns ``{"max_abs": largest |g| before clamping}`` (0-d tensor, from one fused inf-norm pass).

    Args:
        clip_value: c, every element is clamped to [−c, c] (> 0).
    """

    paper = "On the difficulty of training Recurrent Neural Networks"
    keeps_finite = True

    def __init__(self, clip_value: float):
        self.clip_value = check_range("clip_value", clip_value, 0.0, low_open=True)

    def __call__(self, params: Iterable[torch.Tensor]) -> dict[str, Any]:
        ps, grads = grads_of(params)
        if not grads:
            return {}
        with torch.no_grad():
            max_abs = global_norm(grads, math.inf)
        if has_graph(grads):
            with torch.enable_grad():
                replace_grads(ps, [g.clamp(-self.clip_value, self.clip_value) for g in grads])
            return {"max_abs": max_abs}
        for group in group_by_device_dtype([grads]):
            torch._foreach_clamp_min_(group[0], -self.clip_value)
            torch._foreach_clamp_max_(group[0], self.clip_value)
        return {"max_abs": max_abs}

    def __repr__(self) -> str:
        return f"ClipValue(clip_value={self.clip_value})"
