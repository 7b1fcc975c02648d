"""Classifier guidance with a noise-aware classifier, its gradient from any gradient source.

Paper: "Diffusion Models Beat GANs on Image Synthesis" (Dhariwal & Nichol, 2021); flow form as in "Elucidating
The Design Space of Classifier-Guided Diffusion Generation" (Ma et al., 2024) and GUIDE.md §2.1.

A score shift ``w·∇_x log p_t(c|x)`` is, on the linear path, the velocity shift

    ṽ = v + w·((1 − t)/t)·∇_x log p_t(c | x)

With the *exact* noise-aware classifier p_t(c|x) (the posterior class probability of x_t) and ``v = v_u`` this is
CFG pointwise: ``((1−t)/t)·∇log p_t(c|x) = v_c − v_u``. (1 − t)/t is singular at t = 0, where ∇log p_t(c|x)
vanishes: the term is evaluated at ``max(t, t_floor)``. The gradient comes from a ``gk.sources`` source on a
per-sample closure — ``Backprop`` (default), or ``SPSA`` / ``ES`` / ``ForwardGradient`` for a black-box classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._validate import check_range
from ._grad import GradientEstimator
from ._util import check_scale, scale_at
from .base import Composite, Guidance, StepContext, Unconditional, as_rule

Tensor = torch.Tensor

__all__ = ["ClassifierGuidance", "labels_of"]


def labels_of(cond: Any, batch: int, device: torch.device, who: str = "classifier guidance") -> Tensor:
    """The sampler's condition as ``[B]`` integer class labels."""
    if cond is None or isinstance(cond, dict):
        raise ValueError(f"{who} needs integer class labels as the sampler's condition")
    lab = torch.as_tensor(cond, device=device).long()
    return lab.expand(batch) if lab.ndim == 0 else lab


class ClassifierGuidance(Composite):
    """Noise-aware classifier guidance: add ``w·((1−t)/t)·∇_x log p_t(c|x)`` to a base velocity.

    Args:
        classifier: ``classifier(x, t) -> logits [B, C]`` on noisy states (``t`` a ``[B]`` tensor); log-softmax is
            applied, so log-probabilities work too.
        scale: w (default 1.0; w = 1 with an exact classifier samples the class-conditional law). A callable
            ``scale(t)`` gives a schedule.
        base: the velocity guided (default :class:`~gradkit.guide.Unconditional`; e.g. :class:`CFG` to stack).
        source: gradient source factory ``source(buffer) -> Source`` (default ``gk.sources.Backprop``; e.g.
            ``functools.partial(gk.sources.SPSA, eps=1e-3, n_directions=16)`` for a black-box classifier).
        transforms: ``gk.transforms`` applied to the gradient (default none).
        t_floor: the guidance term is evaluated at ``max(t, t_floor)`` (default 1e-3).
        on_nonfinite: ``"raise"`` (default), ``"skip"`` (drop the term for rows with a NaN/Inf gradient, counted
            in ``skipped``) or ``"ignore"``.
    """

    paper = "Diffusion Models Beat GANs on Image Synthesis"
    parts = {"base": "base", "grad": "grad"}

    def __init__(self, classifier: Callable[[Tensor, Tensor], Tensor], scale: float | Callable = 1.0, *,
                 base: Guidance | None = None, source: Callable | None = None, transforms: Sequence[Any] = (),
                 t_floor: float = 1e-3, on_nonfinite: str = "raise"):
        if not callable(classifier):
            raise ValueError(f"classifier must be callable, got {type(classifier).__name__}")
        self.classifier = classifier
        self.scale = check_scale("scale", scale)
        self.base = as_rule(base, Unconditional())
        self.t_floor = check_range("t_floor", t_floor, 0.0, 1.0, low_open=True, high_open=True)
        self.grad = GradientEstimator(source, transforms, on_nonfinite)

    def log_prob_grad(self, x: Tensor, t: float, labels: Tensor) -> Tensor:
        """``∇_x log p_t(c|x)`` per sample, from the source."""
        tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        rows = torch.arange(x.shape[0], device=x.device)

        def f(xb: Tensor) -> Tensor:
            return torch.log_softmax(self.classifier(xb, tt), dim=1)[rows, labels]

        return self.grad(x, f)[0]

    def velocity(self, ctx: StepContext) -> Tensor:
        v = self.base.velocity(ctx)
        w = scale_at(self.scale, ctx.t)
        if w == 0.0 or ctx.t >= 1.0:
            return v
        tg = max(ctx.t, self.t_floor)
        g = self.log_prob_grad(ctx.x, tg, labels_of(ctx.cond, ctx.x.shape[0], ctx.x.device))
        return v + (w * (1.0 - tg) / tg) * g

