"""CFG-Zero* — optimised scale and zero-init for flow matching.

Paper: "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models" (Fan et al., 2025).

Per sample (inner products over all non-batch dimensions):

    s* = ⟨v_c, v_u⟩ / (‖v_u‖² + ε)            the least-squares scale argmin_s ‖v_c − s·v_u‖²
    ṽ  = s*·v_u + w·(v_c − s*·v_u)            (diffusers formulation; "original": v_c + w·(v_c − s*·v_u))
    ṽ  = 0  for the first K steps              (zero-init: those Euler steps leave x unchanged)

Off-by-one: ``zero_init_steps = K`` zeroes the steps with index < K (diffusers' meaning, default 1); the authors'
pipelines zero ``i <= zero_steps``, i.e. their ``zero_steps = K − 1`` (their README: ≈ 4 % of the steps).
With an exact model s* ≠ 1 in general, so CFG-Zero* ≠ CFG even on exact velocities: it is a correction for model
error, not a different target.
"""

from __future__ import annotations

from typing import Any

import torch

from .._validate import check_int, check_range
from ._util import check_formulation, check_scale, flat_dot, scale_at
from .base import Guidance, StepContext

Tensor = torch.Tensor

__all__ = ["CFGZeroStar", "optimized_scale"]


def optimized_scale(pred_cond: Tensor, pred_uncond: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-sample ``s* = ⟨c, u⟩ / (‖u‖² + eps)``, shaped ``[B, 1, ...]``.

    Args:
        pred_cond: conditional prediction c.
        pred_uncond: unconditional prediction u.
        eps: ε in the denominator (default 1e-8).
    """
    return flat_dot(pred_cond, pred_uncond) / (flat_dot(pred_uncond, pred_uncond) + eps)


class CFGZeroStar(Guidance):
    """CFG with the per-sample optimised unconditional scale s* and zeroed first steps.

    Args:
        scale: guidance scale w (required; as for :class:`CFG`).
        zero_init_steps: number K of initial steps whose velocity is zero (default 1, diffusers' default; steps
            with index < K; costs no NFE). The authors suggest ≈ 4 % of the steps.
        uncond: the unconditional condition (default ``None``).
        formulation: ``"diffusers"`` (default) or ``"original"``, as for :class:`CFG`.
        use_optimized_scale: apply s* (default True; False gives CFG with zero-init only).
        eps: ε in the denominator of s* (default 1e-8, the reference value).
    """

    paper = "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models"

    def __init__(self, scale: float, *, zero_init_steps: int = 1, uncond: Any = None, formulation: str = "diffusers",
                 use_optimized_scale: bool = True, eps: float = 1e-8):
        self.scale = check_scale("scale", scale)
        self.zero_init_steps = check_int("zero_init_steps", zero_init_steps, 0)
        self.uncond = uncond
        self.formulation = check_formulation(formulation)
        self.use_optimized_scale = bool(use_optimized_scale)
        self.eps = check_range("eps", eps, 0.0)

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, *, step: int | None = None,
                t: float | None = None) -> Tensor:
        """The rule on given predictions; ``step`` (if given) applies zero-init."""
        if step is not None and step < self.zero_init_steps:
            return torch.zeros_like(pred_cond)
        w = scale_at(self.scale, 0.0 if t is None else t)
        u = pred_uncond
        if self.use_optimized_scale:
            # computed in float32 at least, like the reference, so half-precision inputs do not lose s*
            hi = torch.promote_types(pred_cond.dtype, torch.float32)
            s = optimized_scale(pred_cond.to(hi), pred_uncond.to(hi), self.eps).to(pred_cond.dtype)
            u = pred_uncond * s
        base = u if self.formulation == "diffusers" else pred_cond
        return base + w * (pred_cond - u)

    def velocity(self, ctx: StepContext) -> Tensor:
        if ctx.step < self.zero_init_steps:
            return torch.zeros_like(ctx.x)
        return self.combine(ctx.velocity(), ctx.velocity(self.uncond), t=ctx.t)
