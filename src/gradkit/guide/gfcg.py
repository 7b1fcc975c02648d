"""GFCG — gradient-free classifier guidance.

Paper: "Gradient-Free Classifier Guidance for Diffusion Model Sampling" (Shenoy et al., 2024).

At each step a clean (off-the-shelf) classifier is run in inference mode on the data prediction x̂1 of the
conditional velocity; it picks a time-adaptive *reference class* ĉ (the most probable class other than the target
c) and a scale s_t; the sampler is then pushed away from ĉ:

    ṽ = v_base + s_t·(v_c − v_ĉ)                    (v_base = v_c by default, or CFG / Autoguidance on top)

Structure verified from the paper's abstract; its exact formulas for s_t were not available (no reference code
found): ``adaptive=True`` uses ``s_t = s·(1 − p_c(x̂1))`` — stronger while the classifier is confused — as gradkit's
choice; pass a callable for another rule, or ``adaptive=False`` for a constant s. With a constant s and two
Gaussian classes of one covariance the rule is an affine combination with weights summing to 1, so the endpoint is
exactly ``N(m_c + s(m_c − m_ĉ), Σ)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._validate import check_range
from .base import Composite, Conditional, Guidance, StepContext, as_rule
from .classifier_guidance import labels_of

Tensor = torch.Tensor

__all__ = ["GFCG"]


class GFCG(Composite):
    """Guidance away from the classifier's most confusable class, with no classifier gradient.

    Args:
        classifier: clean classifier ``classifier(x) -> logits [B, C]`` (inference only; it sees x̂1).
        scale: s (default 1.0).
        adaptive: ``True`` (default) for ``s_t = s·(1 − p_c(x̂1))``, ``False`` for a constant s, or a callable
            ``(probs [B, C], labels [B]) -> [B]`` giving s_t.
        base: the guidance whose velocity the GFCG term is added to (default: the conditional velocity; e.g.
            :class:`CFG` or :class:`Autoguidance` to combine them).

    The sampler's condition must be integer class labels (an int or a ``[B]`` tensor): the model is evaluated with
    the reference labels ĉ as its condition.
    """

    paper = "Gradient-Free Classifier Guidance for Diffusion Model Sampling"

    def __init__(self, classifier: Callable[[Tensor], Tensor], scale: float = 1.0, *,
                 adaptive: bool | Callable[[Tensor, Tensor], Tensor] = True, base: Guidance | None = None):
        if not callable(classifier):
            raise ValueError(f"classifier must be callable, got {type(classifier).__name__}")
        self.classifier = classifier
        self.scale = check_range("scale", scale)
        self.adaptive = adaptive
        self.base = as_rule(base, Conditional())
        self.last_reference: Tensor | None = None

    def reference(self, probs: Tensor, labels: Tensor) -> Tensor:
        """The most probable class other than each row's label."""
        masked = probs.clone()
        masked[torch.arange(probs.shape[0]), labels] = -1.0
        return masked.argmax(1)

    def velocity(self, ctx: StepContext) -> Tensor:
        labels = labels_of(ctx.cond, ctx.x.shape[0], ctx.x.device, "GFCG")
        v = self.base.velocity(ctx)
        v_c = ctx.velocity()
        with torch.no_grad():
            probs = torch.softmax(self.classifier(ctx.x1(v_c)).to(torch.float64), dim=1)
        ref = self.reference(probs, labels)
        self.last_reference = ref
        if callable(self.adaptive):
            s = torch.as_tensor(self.adaptive(probs, labels), dtype=ctx.x.dtype)
        elif self.adaptive:
            s = self.scale * (1.0 - probs[torch.arange(labels.numel()), labels]).to(ctx.x.dtype)
        else:
            s = torch.full((ctx.x.shape[0],), self.scale, dtype=ctx.x.dtype, device=ctx.x.device)
        v_ref = ctx.velocity(ref)
        return v + s.reshape(-1, *([1] * (ctx.x.ndim - 1))) * (v_c - v_ref)

