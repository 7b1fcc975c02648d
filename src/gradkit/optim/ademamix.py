"""AdEMAMix: Adam with a mixture of a fast and a slow gradient EMA.

Paper: "The AdEMAMix Optimizer: Better, Faster, Older" (Pagliardini, Ablin & Grangier, 2024).

    m1 ← β1·m1 + (1−β1)·g,   m2 ← β3(t)·m2 + (1−β3(t))·g,   v ← β2·v + (1−β2)·g²
    p ← p − lr · (m1/(1−β1^t) + α(t)·m2) / (√v/√(1−β2^t) + ε)

With ``t_alpha_beta3`` set, α(t) = min(t·α/T, α) and β3(t) = min(exp(ln β1·ln β3 / ((1−t/T)·ln β3 + (t/T)·ln β1)), β3)
warm up over T steps, as in the paper. Argument names and defaults follow ``pytorch-optimizer``'s AdEMAMix
(the parity oracle): ``weight_decouple=False`` adds λ·p to the gradient; ``True`` decays the weights by
``lr·λ`` (or by λ with ``fixed_decay=True``).
"""

from __future__ import annotations

import math
from typing import Any

from .._kernels import Elementwise
from .._validate import check_betas, check_nonneg, check_positive, check_range
from ._base import ElementwiseOptimizer, ParamsT, decay_scalars

__all__ = ["AdEMAMix"]


def _ademamix(p, g, m1, v, m2, *, decay, l2, beta1c, beta2, beta2c, beta3c, bc1, bc2_sqrt, alpha, lr, eps,
              coupled=False):
    if coupled:
        g = g + p * l2
    p.mul_(decay)
    m1.lerp_(g, beta1c)
    v.mul_(beta2).add_(g.square().mul_(beta2c))
    m2.lerp_(g, beta3c)
    denom = v.sqrt().div_(bc2_sqrt).add_(eps)
    p.sub_((m1 / bc1).add_(m2 * alpha).div_(denom).mul_(lr))


ADEMAMIX = Elementwise(_ademamix, "ademamix")


class AdEMAMix(ElementwiseOptimizer):
    """AdEMAMix with the α/β3 warm-up of the paper (``t_alpha_beta3``).

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        lr: the learning rate η. Default 1e-3.
        betas: (β1, β2, β3): decay rates of the fast EMA m1, of v and of the slow EMA m2. Default (0.9, 0.999, 0.9999).
        weight_decay: λ (see ``weight_decouple``). Default 0.
        weight_decouple: True decays the weights by lr·λ (decoupled); False adds λ·p to the gradient. Default False.
        fixed_decay: with ``weight_decouple``, decay by λ instead of lr·λ. Default False.
        alpha: α, the weight of the slow EMA m2 in the update. Default 5.0.
        t_alpha_beta3: T_{α,β3}, the number of steps over which α and β3 warm up (None: no warm-up). Default None.
        eps: ε in the denominator. Default 1e-8.
        kernel, on_nonfinite: how the update runs and what a NaN/Inf gradient does, as for
            :class:`~gradkit.optim.Optimizer` (defaults ``"auto"`` and ``"raise"``).
    """

    paper = "The AdEMAMix Optimizer: Better, Faster, Older"

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 weight_decay: float = 0.0, weight_decouple: bool = False, fixed_decay: bool = False,
                 alpha: float = 5.0, t_alpha_beta3: float | None = None, eps: float = 1e-8, *,
                 kernel: str = "auto", on_nonfinite: str = "raise"):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, weight_decouple=weight_decouple,
                        fixed_decay=fixed_decay, alpha=alpha, t_alpha_beta3=t_alpha_beta3, eps=eps)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_betas("betas", group["betas"], 3)
        check_nonneg("weight_decay", group["weight_decay"])
        check_nonneg("alpha", group["alpha"])
        if group["t_alpha_beta3"] is not None:
            check_positive("t_alpha_beta3", group["t_alpha_beta3"])
            check_range("betas[0]", group["betas"][0], 0.0, 1.0, low_open=True, high_open=True)
            check_range("betas[2]", group["betas"][2], 0.0, 1.0, low_open=True, high_open=True)
        check_positive("eps", group["eps"])

    def _state_keys(self, group):
        return ("exp_avg", "exp_avg_sq", "exp_avg_slow")

    def _rule(self, group):
        return ADEMAMIX.variant(coupled=not group["weight_decouple"] and group["weight_decay"] != 0)

    @staticmethod
    def schedules(step: int, alpha: float, beta1: float, beta3: float, t_alpha_beta3: float | None
                  ) -> tuple[float, float]:
        """(α(t), β3(t)) at 1-based ``step``."""
        if t_alpha_beta3 is None:
            return alpha, beta3
        frac = step / t_alpha_beta3
        alpha_t = min(frac * alpha, alpha)
        lb1, lb3 = math.log(beta1), math.log(beta3)
        beta3_t = min(math.exp(lb1 * lb3 / ((1.0 - frac) * lb3 + frac * lb1)), beta3)
        return alpha_t, beta3_t

    def _scalars(self, group, step):
        beta1, beta2, beta3 = group["betas"]
        alpha_t, beta3_t = self.schedules(step, group["alpha"], beta1, beta3, group["t_alpha_beta3"])
        return dict(
            **decay_scalars(group),
            beta1c=1.0 - beta1, beta2=beta2, beta2c=1.0 - beta2, beta3c=1.0 - beta3_t,
            bc1=1.0 - beta1**step, bc2_sqrt=math.sqrt(1.0 - beta2**step),
            alpha=alpha_t, lr=group["lr"], eps=group["eps"],
        )
