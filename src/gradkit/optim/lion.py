"""Lion (EvoLved Sign Momentum).

Paper: "Symbolic Discovery of Optimization Algorithms" (Chen et al., 2023).

    u ← sign(β1·m + (1−β1)·g),   p ← p·(1 − lr·λ) − lr·u,   m ← β2·m + (1−β2)·g

Defaults and argument names follow the authors' ``lion-pytorch`` package (lr 1e-4, betas (0.9, 0.99));
use a learning rate 3-10× smaller than AdamW's and a weight decay 3-10× larger.
"""

from __future__ import annotations

from typing import Any

from .._kernels import Elementwise
from .._validate import check_betas, check_nonneg
from ._base import ElementwiseOptimizer, ParamsT

__all__ = ["Lion"]


def _lion(p, g, m, *, decay, beta1, beta1c, beta2, beta2c, lr):
    p.mul_(decay)
    # Written as m·β + g·(1−β) rather than lerp: the sign is taken of this sum, so it is computed the
    # way the reference computes it, to keep ties at zero rare between implementations.
    p.sub_((m * beta1 + g * beta1c).sign().mul_(lr))
    m.mul_(beta2).add_(g * beta2c)


LION = Elementwise(_lion, "lion")


class Lion(ElementwiseOptimizer):
    """Lion: the sign of an interpolated momentum, with decoupled weight decay.

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        lr: the learning rate η (3-10x smaller than AdamW's). Default 1e-4.
        betas: (β1, β2): β1 interpolates momentum and gradient inside the sign, β2 is the momentum's decay. Default
            (0.9, 0.99).
        weight_decay: λ, decoupled: p ← p·(1 − lr·λ). Default 0.
        kernel, on_nonfinite: how the update runs and what a NaN/Inf gradient does, as for
            :class:`~gradkit.optim.Optimizer` (defaults ``"auto"`` and ``"raise"``).
    """

    paper = "Symbolic Discovery of Optimization Algorithms"

    def __init__(self, params: ParamsT, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, kernel: str = "auto", on_nonfinite: str = "raise"):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_betas("betas", group["betas"], 2)
        check_nonneg("weight_decay", group["weight_decay"])

    def _state_keys(self, group):
        return ("exp_avg",)

    def _rule(self, group):
        return LION

    def _scalars(self, group, step):
        beta1, beta2 = group["betas"]
        return dict(decay=1.0 - group["lr"] * group["weight_decay"], beta1=beta1, beta1c=1.0 - beta1,
                    beta2=beta2, beta2c=1.0 - beta2, lr=group["lr"])
