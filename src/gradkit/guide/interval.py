"""When to guide: the guidance interval / start–stop wrapper.

Paper: "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion Models"
(Kynkäänniemi et al., 2024) — guide only for a middle range of noise levels, use the conditional model elsewhere.
The authors' sampler (kynkaat/guidance-interval ``sampling/edm_sampler.py``) takes an inclusive range of *step
indices* and decides once per step for both Heun stages; their README's FID-optimal EDM2-XXL run uses steps
[17, 22] of 32 with G = 2.0, i.e. steps starting at EDM σ ∈ [0.283, 1.609]. diffusers approximates the idea on every
guider with ``start``/``stop`` *fractions of the steps*. All three units are offered.

The decision is taken once per step from the step's start (all solver stages of a step are treated alike), so an
unguided step costs only the conditional NFE.
"""

from __future__ import annotations

import torch

from .._validate import check_choice, check_range
from .base import Composite, Conditional, Guidance, StepContext

Tensor = torch.Tensor

__all__ = ["GuidanceInterval"]


class GuidanceInterval(Composite):
    """Apply ``rule`` only inside an interval; ``outside`` (default: the conditional velocity) elsewhere.

    Args:
        rule: the guidance applied inside (e.g. :class:`CFG`).
        start, stop: the interval's ends in ``unit`` (defaults 0.0 and 1.0 for ``"t"``/``"steps"``; required for
            ``"sigma"``).
        unit: ``"t"`` — path time, guided when ``start ≤ t < stop``; ``"sigma"`` — EDM noise level
            ``σ = (1 − t)/t``, guided when ``start < σ ≤ stop``; ``"index"`` — step indices, guided when
            ``start ≤ i ≤ stop`` (inclusive, the authors' ``guidance_interval=[17, 22]``); ``"steps"`` — fractions
            of the steps, guided when ``int(start·N) ≤ i < int(stop·N)`` (diffusers' ``start``/``stop``).
        outside: the guidance used outside the interval (default :class:`~gradkit.guide.Conditional`).
    """

    paper = "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion Models"
    parts = {"rule": "rule", "outside": "outside"}

    def __init__(self, rule: Guidance, *, start: float = 0.0, stop: float = 1.0, unit: str = "t",
                 outside: Guidance | None = None):
        if not isinstance(rule, Guidance):
            raise ValueError(f"rule must be a gradkit.guide.Guidance, got {type(rule).__name__}")
        self.rule = rule
        self.unit = check_choice("unit", unit, ("t", "sigma", "steps", "index"))
        hi = None if unit in ("sigma", "index") else 1.0
        self.start = check_range("start", start, 0.0, hi)
        self.stop = check_range("stop", stop, self.start, hi)
        self.outside = outside if outside is not None else Conditional()
        if not isinstance(self.outside, Guidance):
            raise ValueError(f"outside must be a gradkit.guide.Guidance, got {type(outside).__name__}")

    def active(self, step: int, num_steps: int, t_step: float) -> bool:
        """Whether the step ``step`` (of ``num_steps``, starting at time ``t_step``) is guided."""
        if self.unit == "steps":
            return int(self.start * num_steps) <= step < int(self.stop * num_steps)
        if self.unit == "index":
            return self.start <= step <= self.stop
        if self.unit == "t":
            return self.start <= t_step < self.stop
        sigma = float("inf") if t_step <= 0 else (1.0 - t_step) / t_step
        return self.start < sigma <= self.stop

    def velocity(self, ctx: StepContext) -> Tensor:
        on = self.active(ctx.step, ctx.num_steps, ctx.t_step)
        return (self.rule if on else self.outside).velocity(ctx)

    def step(self, ctx: StepContext) -> Tensor | None:
        on = self.active(ctx.step, ctx.num_steps, ctx.t_step)
        return (self.rule if on else self.outside).step(ctx)

