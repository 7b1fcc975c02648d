"""CFG++ — manifold-constrained classifier-free guidance (flow form).

Paper: "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models" (Chung et al., 2025).

The authors' DDIM step denoises with the guided prediction but renoises with the *unconditional* noise:
``x_{t−1} = √ᾱ_{t−1}·x̂(ε_λ) + √(1−ᾱ_{t−1})·ε_u``, ``ε_λ = ε_u + λ(ε_c − ε_u)``, λ ∈ [0, 1]. On the linear path
(x̂1 = data prediction, x̂0 = noise prediction) the step t → t′ is

    x′ = (1 − t′)·x̂0(v_u) + t′·x̂1(v_λ) = x + (t′ − t)·v_u + t′(1 − t)·λ·(v_c − v_u),    v_λ = v_u + λ(v_c − v_u)

— plain CFG with the step-dependent scale ``w_eff = λ·t′(1 − t)/(t′ − t)`` (= λσ_i/(σ_i − σ_{i+1}) in EDM σ). The
guidance is O(1) per step rather than O(h), so CFG++'s strength grows with the number of steps. The flow form is
derived here (exact algebra); the authors' code is DDIM / Euler in ε and σ.
"""

from __future__ import annotations

from typing import Any

import torch

from .._validate import check_range
from .base import Guidance, StepContext

Tensor = torch.Tensor

__all__ = ["CFGPlusPlus", "effective_scale"]


def effective_scale(lam: float, t: float, t_next: float) -> float:
    """The CFG scale equivalent to one CFG++ step t → t′: ``λ·t′(1 − t)/(t′ − t)``."""
    return lam * t_next * (1.0 - t) / (t_next - t)


class CFGPlusPlus(Guidance):
    """CFG++ (step level; Euler/DDIM steps only): guided data prediction, unconditional noise prediction.

    Args:
        lam: λ ∈ [0, 1] (default 0.6, the authors' text-to-image example; λ = 0 is the unconditional sampler).
        uncond: the unconditional condition (default ``None``).
    """

    paper = "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models"
    methods = ("euler",)

    def __init__(self, lam: float = 0.6, *, uncond: Any = None):
        self.lam = check_range("lam", lam, 0.0)
        self.uncond = uncond

    def step(self, ctx: StepContext) -> Tensor:
        v_u = ctx.velocity(self.uncond)
        v_c = ctx.velocity() if self.lam != 0.0 else v_u
        v_lam = v_u + self.lam * (v_c - v_u)
        return (1.0 - ctx.t_next) * ctx.x0(v_u) + ctx.t_next * ctx.x1(v_lam)
