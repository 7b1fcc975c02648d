"""APG — adaptive projected guidance.

Paper: "Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion Models" (Sadat et al., 2025).

Per sample (norms and inner products over all non-batch dimensions), with p_c, p_u the conditional / unconditional
predictions in the chosen space:

    Δ ← p_c − p_u;   m ← Δ + β·m (m₀ = 0), Δ ← m            momentum β (the paper recommends negative β)
    Δ ← Δ·min(1, r/‖Δ‖)                                      norm threshold r
    Δ∥ = ⟨Δ, p̂_c⟩·p̂_c,  p̂_c = p_c/‖p_c‖;   Δ⊥ = Δ − Δ∥        (projection in float64)
    p̃ = p_c + (w − 1)·(Δ⊥ + η·Δ∥)                           formulation="paper"
    p̃ = p_u + w·(Δ⊥ + η·Δ∥)                                 formulation="diffusers" (its default form)

The paper applies the rule to the denoised prediction (here x̂1 = x + (1−t)·v, ``space="x1"``); diffusers applies
it to whatever the pipeline predicts (``space="native"``: the velocity here). The projection is not invariant to
the parameterisation, so the two spaces give different samplers. With η = 1, β = 0, r = ∞ both reduce to CFG.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._validate import check_choice, check_range
from ._util import check_scale, check_threshold, flat_dot, flat_norm, scale_at
from .base import Guidance, StepContext

Tensor = torch.Tensor

__all__ = ["APG", "project"]


def project(v: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
    """``(v∥, v⊥)``: the parts of ``v`` along / orthogonal to ``direction``, per sample, computed in float64."""
    v64, d64 = v.double(), direction.double()
    dn = d64 / flat_norm(d64).clamp_min(1e-12)
    par = flat_dot(v64, dn) * dn
    return par.to(v.dtype), (v64 - par).to(v.dtype)


class APG(Guidance):
    """Adaptive projected guidance: CFG with the update's component along p_c down-weighted, rescaled, with
    (reverse) momentum.

    Args:
        scale: guidance scale w (required; in the paper's form the update is ``(w − 1)·…``).
        eta: weight η of the parallel component (default 0.0, the paper's recommendation; 1.0 keeps it, diffusers'
            default).
        momentum: β of the running average ``m ← Δ + β·m`` (default −0.5, the negative "reverse" momentum used by
            ports of the paper; 0 disables it; diffusers' default is off).
        norm_threshold: r, the maximum norm of the update (default 15.0, diffusers' default; ``None`` or ``inf``
            disables it; the paper tunes r per model, 2.5–15).
        space: ``"x1"`` (default, the paper: on the data prediction x̂1) or ``"native"`` (on the velocity, as
            diffusers does on whatever the network predicts).
        formulation: ``"paper"`` (default) ``p_c + (w − 1)(Δ⊥ + ηΔ∥)`` or ``"diffusers"`` ``p_u + w(Δ⊥ + ηΔ∥)``.
        uncond: the unconditional condition (default ``None``).

    The momentum buffer is per sample, reset when sampling starts and kept in ``state_dict()``. Each evaluation
    of the rule updates it (Heun / RK4 evaluate several times per step).
    """

    paper = "Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion Models"

    def __init__(self, scale: float, *, eta: float = 0.0, momentum: float = -0.5, norm_threshold: float | None = 15.0,
                 space: str = "x1", formulation: str = "paper", uncond: Any = None):
        self.scale = check_scale("scale", scale)
        self.eta = check_range("eta", eta)
        self.momentum = check_range("momentum", momentum, None, 1.0, high_open=True)
        self.norm_threshold = check_threshold("norm_threshold", norm_threshold)
        self.space = check_choice("space", space, ("x1", "native"))
        self.formulation = check_choice("formulation", formulation, ("paper", "diffusers"))
        self.uncond = uncond
        self.buffer: Tensor | None = None

    def reset(self, x: Tensor, num_steps: int) -> None:
        self.buffer = None

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, *, t: float | None = None) -> Tensor:
        """The rule on given predictions in their own space (updates the momentum buffer)."""
        w = scale_at(self.scale, 0.0 if t is None else t)
        raw = pred_cond - pred_uncond
        delta = raw
        if self.momentum != 0.0:
            self.buffer = delta if self.buffer is None else delta + self.momentum * self.buffer
            delta = self.buffer
        if math.isfinite(self.norm_threshold):
            nrm = flat_norm(delta)
            delta = delta * torch.minimum(torch.ones_like(nrm), self.norm_threshold / nrm)
        par, orth = project(delta, pred_cond)
        upd = orth + self.eta * par
        if self.formulation == "paper":
            return pred_cond + (w - 1.0) * upd
        return pred_uncond + w * upd

    def velocity(self, ctx: StepContext) -> Tensor:
        v_c, v_u = ctx.velocity(), ctx.velocity(self.uncond)
        if self.space == "native" or 1.0 - ctx.t < 1e-12:  # x̂1 = x at t = 1: no x1-space direction left
            return self.combine(v_c, v_u, t=ctx.t)
        p = self.combine(ctx.x1(v_c), ctx.x1(v_u), t=ctx.t)
        return (p - ctx.x) / (1.0 - ctx.t)

    def reindex(self, index: Tensor) -> None:
        if self.buffer is not None:
            self.buffer = self.buffer[index]

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = state["buffer"]
