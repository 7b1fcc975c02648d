"""Adaptive Guidance — switch CFG off once the conditional and unconditional predictions agree.

Paper: "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models" (Castillo et al., 2023):
"AG preserves CFG's image quality while reducing computation by 25%".

Per sample, at each guided evaluation: ``γ = cos(p_c, p_u)`` (flattened); while ``γ ≤ γ̄`` use CFG; from the first
evaluation with ``γ > γ̄`` on, that sample uses the conditional prediction only, for all remaining steps (its
unconditional evaluations are no longer made: NFE drops from 2 to 1 per step). The switch is per sample, so a
sample's trajectory does not depend on its batch mates. The paper's threshold γ̄ was not verified; community ports
use γ̄ ∈ [0.99, 1).
"""

from __future__ import annotations

from typing import Any

import torch

from .._validate import check_choice, check_range
from ._util import check_formulation, check_scale, flat_dot, flat_norm, scale_at
from .base import Guidance, StepContext
from .cfg import cfg

Tensor = torch.Tensor

__all__ = ["AdaptiveGuidance"]


class AdaptiveGuidance(Guidance):
    """CFG that turns itself off, per sample, once cond and uncond agree (cosine above ``threshold``).

    Args:
        scale: CFG scale w (required).
        threshold: γ̄, the cosine similarity above which CFG is switched off (default 0.99).
        space: where the cosine is measured: ``"velocity"`` (default), ``"x0"`` (noise predictions, the
            ε-analogue of the paper) or ``"x1"`` (data predictions). On the linear path the noise prediction
            ``x − t·v`` equals ``x`` at t = 0 whatever the velocity, so with ``"x0"`` the cosine starts at 1 and CFG
            switches off at the first step; use ``"velocity"`` or ``"x1"`` for flow models.
        uncond: the unconditional condition (default ``None``).
        formulation: CFG formulation, ``"diffusers"`` (default) or ``"original"``.

    ``switched`` (``[B]`` bool) and ``switch_step`` (``[B]``, −1 = never) are the state (``state_dict()``).
    """

    paper = "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models"

    def __init__(self, scale: float, *, threshold: float = 0.99, space: str = "velocity", uncond: Any = None,
                 formulation: str = "diffusers"):
        self.scale = check_scale("scale", scale)
        self.threshold = check_range("threshold", threshold, -1.0, 1.0)
        self.space = check_choice("space", space, ("velocity", "x0", "x1"))
        self.uncond = uncond
        self.formulation = check_formulation(formulation)
        self.switched: Tensor | None = None
        self.switch_step: Tensor | None = None

    def reset(self, x: Tensor, num_steps: int) -> None:
        self.switched = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.switch_step = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)

    def _measure(self, ctx: StepContext, v_c: Tensor, v_u: Tensor, rows: Tensor) -> Tensor:
        x, t = ctx.x[rows], ctx.t
        if self.space == "x0":
            a, b = ctx.x0(v_c, x, t), ctx.x0(v_u, x, t)
        elif self.space == "x1":
            a, b = ctx.x1(v_c, x, t), ctx.x1(v_u, x, t)
        else:
            a, b = v_c, v_u
        cos = flat_dot(a, b) / (flat_norm(a) * flat_norm(b)).clamp_min(1e-30)
        return cos.flatten().clamp(-1.0, 1.0)  # rounding can exceed 1: threshold 1 must mean never

    def velocity(self, ctx: StepContext) -> Tensor:
        if self.switched is None or self.switched.shape[0] != ctx.x.shape[0]:
            self.reset(ctx.x, ctx.num_steps)
        v_c = ctx.velocity()
        active = (~self.switched).nonzero().flatten()
        if active.numel() == 0:
            return v_c
        rows = None if active.numel() == ctx.x.shape[0] else active
        v_u = ctx.velocity(self.uncond) if rows is None else ctx.velocity(self.uncond, rows=rows)
        vc_a = v_c if rows is None else v_c[rows]
        out = v_c.clone()
        out[active] = cfg(vc_a, v_u, scale_at(self.scale, ctx.t), formulation=self.formulation)
        cos = self._measure(ctx, vc_a, v_u, active)
        newly = active[cos > self.threshold]
        self.switched[newly] = True
        self.switch_step[newly] = ctx.step
        return out

    def reindex(self, index: Tensor) -> None:
        if self.switched is not None:
            self.switched, self.switch_step = self.switched[index], self.switch_step[index]

    def state_dict(self) -> dict[str, Any]:
        return {"switched": self.switched, "switch_step": self.switch_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.switched, self.switch_step = state["switched"], state["switch_step"]
