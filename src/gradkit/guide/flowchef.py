"""FlowChef — steering a rectified flow in the vector field with gradient skipping.

Paper: "Steering Rectified Flow Models in the Vector Field for Controlled Image Generation" (Patel et al., 2025).
Rule read in FlowChef/FlowChef (``inverseproblems/pixel_models/rfpp/generate_inverseproblems_flowchef.py``,
``src/pipeline_rf_inverseproblems.py``): per step, evaluate the velocity once, then take K ascent steps on x with
the data prediction computed from that *frozen* velocity (so ∂x̂1/∂x = I: no backprop through the model), then the
Euler step with the same velocity:

    v = v(x, t);   repeat K:  x ← x + s·∇_{x̂1} r(x̂1),  x̂1 = x + (1 − t)·v;   x′ = x + h·v

for the first ``stop`` fraction of the steps. (The pixel-space code uses a plain gradient step, the latent-space
pipeline Adam.) ``refresh=True`` re-evaluates v before each inner step (1 + K NFE per step instead of 1).
Contraction, exact for ``r = −½‖x̂1 − y‖²``: with frozen v each inner step maps ``x̂1 − y ↦ (1 − s)(x̂1 − y)``; with
refreshed v (re-evaluated before each inner step and for the final Euler step) on
Gaussian data N(m, Σ) it maps ``↦ (I − s·tΣS_t⁻¹)(x̂1 − y)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._validate import check_int, check_range
from ._grad import GradientEstimator
from .base import Composite, Conditional, Guidance, StepContext, as_rule

Tensor = torch.Tensor

__all__ = ["FlowChef"]


class FlowChef(Composite):
    """Gradient-skipping ascent on a reward of x̂1 inside each Euler step (step level).

    Args:
        reward: ``reward(x1) -> [B]`` to increase (for an inverse problem ``−½‖y − A(x1)‖²``).
        step_size: s (default 1.0; the pixel-space reference uses ``gradient_scale = 100`` on a mean-reduced
            loss).
        n_inner: K, ascent steps per sampler step (default 1, as in the reference).
        stop: fraction of the steps that are steered (default 1.0; the reference's ``max_steps``).
        refresh: re-evaluate the velocity before each inner step (default False: frozen, the reference).
        base: the velocity (default :class:`~gradkit.guide.Conditional`; e.g. :class:`CFG`).
        source: gradient source factory on x̂1 (default ``Backprop``; ``SPSA`` / ``ES`` for a black-box reward).
        transforms, on_nonfinite: as for :class:`TFG`.
    """

    paper = "Steering Rectified Flow Models in the Vector Field for Controlled Image Generation"
    parts = {"base": "base", "grad": "grad"}
    methods = ("euler",)

    def __init__(self, reward: Callable[[Tensor], Tensor], *, step_size: float = 1.0, n_inner: int = 1,
                 stop: float = 1.0, refresh: bool = False, base: Guidance | None = None,
                 source: Callable | None = None, transforms: Sequence[Any] = (), on_nonfinite: str = "raise"):
        if not callable(reward):
            raise ValueError(f"reward must be callable, got {type(reward).__name__}")
        self.reward = reward
        self.step_size = check_range("step_size", step_size, 0.0)
        self.n_inner = check_int("n_inner", n_inner, 0)
        self.stop = check_range("stop", stop, 0.0, 1.0)
        self.refresh = bool(refresh)
        self.base = as_rule(base, Conditional())
        self.grad = GradientEstimator(source, transforms, on_nonfinite)

    def inner(self, ctx: StepContext, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The K ascent steps from ``x`` with velocity ``v``; returns the new ``(x, v)``."""
        for k in range(self.n_inner):
            if self.refresh and k > 0:
                v = self.base.velocity(ctx.at(x))
            g, _ = self.grad(ctx.x1(v, x), self.reward)
            x = x + self.step_size * g
        if self.refresh and self.n_inner > 0:
            v = self.base.velocity(ctx.at(x))
        return x, v

    def step(self, ctx: StepContext) -> Tensor:
        v = self.base.velocity(ctx)
        x = ctx.x
        if ctx.step < int(self.stop * ctx.num_steps) and ctx.t < 1.0:
            x, v = self.inner(ctx, x, v)
        return x + ctx.h * v

