"""CFG — classifier-free guidance for flows.

Paper: "Guided Flows for Generative Modeling and Decision Making" (Zheng et al., 2023); CFG itself is Ho & Salimans,
"Classifier-Free Diffusion Guidance" (2022).

    ṽ = v_u + w·(v_c − v_u) = (1 − w)·v_u + w·v_c          (formulation="diffusers", the default; Guided Flows)
    ṽ = v_c + w′·(v_c − v_u),   w′ = w − 1                  (formulation="original", Ho & Salimans)

w = 1 (diffusers form) is the conditional model alone and costs one NFE; w = 0 the unconditional one. Because the
velocity is affine in the score on this path, velocity-, score- and ε-CFG are the same rule.

What CFG samples (and what it does not): at every t it follows the velocity of the tilted *marginals*
``p_t(x|c)^w · p_t(x)^{1−w}``, which is **not** the flow of the tilted target ``p(x|c)^w · p(x)^{1−w}``. They agree
when the conditional and unconditional laws are Gaussians with one covariance (endpoint exactly
``N((1−w)m_u + w·m_c, Σ)``), but for 1-D Gaussians with standard deviations s_u, s_c the CFG endpoint has standard
deviation ``s_u^{1−w}·s_c^w`` while the tilted target has ``(w/s_c² + (1−w)/s_u²)^{−1/2}`` (tests/guide prove both).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ._util import check_formulation, check_scale, scale_at
from .base import Guidance, StepContext

Tensor = torch.Tensor

__all__ = ["CFG", "cfg"]


def cfg(pred_cond: Tensor, pred_uncond: Tensor, scale: float, *, formulation: str = "diffusers") -> Tensor:
    """The CFG combination of two predictions (any parameterisation: the rule is affine).

    Args:
        pred_cond: conditional prediction.
        pred_uncond: unconditional prediction.
        scale: w.
        formulation: ``"diffusers"`` (default) ``u + w(c − u)`` or ``"original"`` ``c + w(c − u)``.
    """
    base = pred_uncond if formulation == "diffusers" else pred_cond
    return base + scale * (pred_cond - pred_uncond)


class CFG(Guidance):
    """Classifier-free guidance: combine the conditional and unconditional velocities.

    Args:
        scale: the guidance scale w (required; task dependent — Guided Flows used 1.5–7, diffusers' default for
            Stable Diffusion is 7.5). A callable ``scale(t)`` gives a time-dependent schedule.
        uncond: what the model receives as the unconditional condition (default ``None``; a negative prompt
            embedding works too).
        formulation: ``"diffusers"`` (default) ``v_u + w(v_c − v_u)``, or ``"original"`` (Ho & Salimans)
            ``v_c + w(v_c − v_u)``; the original form at ``w′`` equals the diffusers form at ``w = w′ + 1``.
    """

    paper = "Guided Flows for Generative Modeling and Decision Making"

    def __init__(self, scale: float | Callable[[float], float], *, uncond: Any = None, formulation: str = "diffusers"):
        self.scale = check_scale("scale", scale)
        self.uncond = uncond
        self.formulation = check_formulation(formulation)

    def _trivial(self, w: float) -> bool:
        # the unconditional prediction drops out: skip its evaluation (diffusers does the same)
        return math.isclose(w, 1.0 if self.formulation == "diffusers" else 0.0)

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, *, t: float | None = None) -> Tensor:
        """The rule on given predictions (``t`` is needed only for a scale schedule)."""
        return cfg(pred_cond, pred_uncond, scale_at(self.scale, 0.0 if t is None else t),
                   formulation=self.formulation)

    def velocity(self, ctx: StepContext) -> Tensor:
        w = scale_at(self.scale, ctx.t)
        v_c = ctx.velocity()
        if self._trivial(w):
            return v_c
        return cfg(v_c, ctx.velocity(self.uncond), w, formulation=self.formulation)
