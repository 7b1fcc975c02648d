"""Autoguidance — guide a model with a weaker version of itself.

Paper: "Guiding a Diffusion Model with a Bad Version of Itself" (Karras et al., 2024).

    ṽ = v_bad + w·(v_good − v_bad)

with the bad model a smaller or less-trained model of the same task and condition (EDM2 presets w ≈ 2.0–2.45).
For 1-D Gaussians with the same mean and standard deviations s_g < s_b the endpoint standard deviation is
``s_b^{1−w}·s_g^w`` (< s_g for w > 1): the same closed form as CFG's.
"""

from __future__ import annotations

from typing import Any

import torch

from ._util import check_scale, scale_at
from .base import SAME, Guidance, StepContext

Tensor = torch.Tensor

__all__ = ["Autoguidance"]


class Autoguidance(Guidance):
    """CFG-like extrapolation from a weaker guide model to the main model.

    Args:
        guide_model: the weaker ("bad") model, ``(x, t, cond) -> prediction`` (its own declared
            parameterisation; plain callables predict velocity).
        scale: w (required; EDM2 presets 2.0–2.45).
        guide_cond: the condition given to the guide model (default: the sampler's condition).
    """

    paper = "Guiding a Diffusion Model with a Bad Version of Itself"

    def __init__(self, guide_model: Any, scale: float, *, guide_cond: Any = SAME):
        if not callable(guide_model):
            raise ValueError(f"guide_model must be callable, got {type(guide_model).__name__}")
        self.guide_model = guide_model
        self.scale = check_scale("scale", scale)
        self.guide_cond = guide_cond

    def velocity(self, ctx: StepContext) -> Tensor:
        v_good = ctx.velocity()
        v_bad = ctx.velocity(self.guide_cond, model=self.guide_model)
        return v_bad + scale_at(self.scale, ctx.t) * (v_good - v_bad)
