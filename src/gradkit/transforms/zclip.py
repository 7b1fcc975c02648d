"""ZClip: z-score based clipping of gradient-norm spikes.

Paper: "ZClip: Adaptive Spike Mitigation for LLM Pre-Training" (Kumar et al., 2025).
EMA mean μ and variance σ² of ‖g‖ (initialised from ``warmup_steps`` norms); z = (‖g‖ − μ)/(σ + ε). When z > z_thresh
the norm is clipped to μ + z_thresh·σ/(z/z_thresh) ("adaptive_scaling") or to μ ("mean"); the statistics then
absorb the clipped norm. ``mode="percentile"`` always clips to μ + z_thresh·σ.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .._validate import check_beta, check_choice, check_int, check_positive
from ._norms import NORM_EPS, measure, scale_grads
from .base import Transform

__all__ = ["ZClip"]


class ZClip(Transform):
    """Adaptive spike clipping with the ``zclip`` package's arguments and semantics.

    During the first ``warmup_steps`` calls the norms are only collected (and ``max_grad_norm``, if set, is
    applied as a plain norm clip). Afterwards the effective threshold is ``min(adaptive, max_grad_norm)``.
    ``skip_update_on_spike=True`` leaves μ and σ² unchanged on a detected spike. ``clip_factor`` multiplies the
    adaptive-scaling threshold. One host synchronisation per step (the decision is made on the host).
    Returns ``{"grad_norm", "threshold", "clipped", "z"}`` as Python numbers (``z`` is NaN during warm-up).

    Args:
        alpha: α, the EMA decay of the norm's mean μ and variance σ². Default 0.97.
        z_thresh: z_thresh, the z-score above which a norm counts as a spike. Default 2.5.
        max_grad_norm: a plain norm clip applied always, also during warm-up (None: none). Default 1.0.
        eps: ε in z = (‖g‖ − μ)/(σ + ε). Default 1e-6.
        warmup_steps: the number of norms collected to initialise μ and σ² before clipping adaptively. Default 25.
        mode: ``'zscore'`` (clip spikes by their z-score) or ``'percentile'`` (always clip to μ + z_thresh·σ). Default
            'zscore'.
        clip_option: where a spike is clipped to: ``'adaptive_scaling'`` or ``'mean'`` (μ). Default 'adaptive_scaling'.
        clip_factor: a multiplier of the adaptive-scaling threshold. Default 1.0.
        skip_update_on_spike: leave μ and σ² unchanged on a spike. Default False.
    """

    paper = "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"
    keeps_finite = True

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: float | None = 1.0,
                 eps: float = 1e-6, warmup_steps: int = 25, mode: str = "zscore",
                 clip_option: str = "adaptive_scaling", clip_factor: float = 1.0, skip_update_on_spike: bool = False):
        self.alpha = check_beta("alpha", alpha)
        self.z_thresh = check_positive("z_thresh", z_thresh)
        self.max_grad_norm = None if max_grad_norm is None else check_positive("max_grad_norm", max_grad_norm)
        self.eps = check_positive("eps", eps)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 1)
        self.mode = check_choice("mode", mode, ("zscore", "percentile"))
        self.clip_option = check_choice("clip_option", clip_option, ("adaptive_scaling", "mean"))
        self.clip_factor = check_positive("clip_factor", clip_factor)
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self._buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    @property
    def initialized(self) -> bool:
        return self.mean is not None

    def _adaptive_threshold(self, norm: float) -> tuple[float | None, float]:
        std = self.var ** 0.5
        z = (norm - self.mean) / (std + self.eps)
        if self.mode == "percentile":
            threshold = self.mean + self.z_thresh * std
            return (threshold if norm > threshold else None), z
        if z <= self.z_thresh:
            return None, z
        if self.clip_option == "mean":
            return self.mean, z
        # Dividing by z/z_thresh makes the allowed norm shrink the larger the outlier.
        return (self.mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor, z

    def __call__(self, params: Iterable[torch.Tensor]) -> dict[str, Any]:
        if (measured := measure(params)) is None:
            return {}
        ps, grads, norm = measured[0], measured[1], float(measured[2])  # the decision is taken on the host
        if not self.initialized:
            self._buffer.append(norm)
            if len(self._buffer) >= self.warmup_steps:
                n = len(self._buffer)
                self.mean = sum(self._buffer) / n
                self.var = sum((x - self.mean) ** 2 for x in self._buffer) / n
                self._buffer = []
            clipped = self.max_grad_norm is not None and norm > self.max_grad_norm
            if self.max_grad_norm is not None:
                scale_grads(ps, grads, min(1.0, self.max_grad_norm / (norm + NORM_EPS)))
            return {"grad_norm": norm, "threshold": self.max_grad_norm or float("inf"), "clipped": clipped,
                    "z": float("nan")}
        spike, z = self._adaptive_threshold(norm)
        threshold = spike if spike is not None else norm
        if self.max_grad_norm is not None:
            threshold = min(threshold, self.max_grad_norm)
        clipped = norm > threshold
        if clipped:
            scale_grads(ps, grads, threshold / (norm + NORM_EPS))
        if spike is None or not self.skip_update_on_spike:
            # The statistics absorb the clipped norm, so one spike cannot inflate the threshold for later steps.
            x = spike if spike is not None else norm
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return {"grad_norm": norm, "threshold": threshold, "clipped": clipped, "z": z}

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": list(self._buffer), "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._buffer = [float(v) for v in state["buffer"]]
        self.mean = None if state["mean"] is None else float(state["mean"])
        self.var = None if state["var"] is None else float(state["var"])

    def __repr__(self) -> str:
        return (f"ZClip(alpha={self.alpha}, z_thresh={self.z_thresh}, max_grad_norm={self.max_grad_norm}, "
                f"warmup_steps={self.warmup_steps}, mode={self.mode!r}, clip_option={self.clip_option!r})")
