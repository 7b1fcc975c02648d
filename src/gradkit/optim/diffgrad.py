"""diffGrad: Adam whose step is damped where the gradient stops changing.

Paper: "diffGrad: An Optimization Method for Convolutional Neural Networks" (Dubey et al., 2019).

    ξ = sigmoid(|g_{t−1} − g_t|),   p ← p − lr·√(1−β2^t)/(1−β1^t) · ξ·m / (√(v + 1e-15) + ε)

with Adam's m and v (g_0 = 0). Argument names, defaults and the weight-decay convention follow
``pytorch-optimizer``'s DiffGrad (the parity oracle; decoupled decay by default). Its ``rectify`` (RAdam)
option is not offered.
"""

from __future__ import annotations

import math
from typing import Any

from .._kernels import Elementwise
from .._validate import check_betas, check_nonneg, check_positive
from ._base import ElementwiseOptimizer, ParamsT, decay_scalars

__all__ = ["DiffGrad"]


def _diffgrad(p, g, m, v, prev, *vmax, decay, l2, beta1c, beta2, beta2c, step_size, eps, coupled=False,
              ams_bound=False):
    if coupled:
        g = g + p * l2
    p.mul_(decay)
    m.lerp_(g, beta1c)
    v.mul_(beta2).add_(g.square().mul_(beta2c))
    if ams_bound:
        vmax[0].copy_(vmax[0].maximum(v))
        v = vmax[0]
    denom = (v + 1e-15).sqrt_().add_(eps)
    xi = (prev - g).abs().sigmoid()
    p.sub_(xi.mul_(m).div_(denom).mul_(step_size))
    prev.copy_(g)


DIFFGRAD = Elementwise(_diffgrad, "diffgrad")


class DiffGrad(ElementwiseOptimizer):
    """diffGrad: Adam scaled elementwise by the sigmoid of the gradient's change.

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        lr: the learning rate α. Default 1e-3.
        betas: (β1, β2): decay rates of Adam's m and v. Default (0.9, 0.999).
        weight_decay: λ (see ``weight_decouple``). Default 0.
        weight_decouple: True decays the weights by lr·λ (decoupled, the default); False adds λ·p to the gradient.
        fixed_decay: with ``weight_decouple``, decay by λ instead of lr·λ. Default False.
        ams_bound: use AMSGrad's running maximum of v. Default False.
        eps: ε in the denominator. Default 1e-8.
        kernel, on_nonfinite: how the update runs and what a NaN/Inf gradient does, as for
            :class:`~gradkit.optim.Optimizer` (defaults ``"auto"`` and ``"raise"``).
    """

    paper = "diffGrad: An Optimization Method for Convolutional Neural Networks"

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, weight_decouple: bool = True, fixed_decay: bool = False,
                 ams_bound: bool = False, eps: float = 1e-8, *, kernel: str = "auto",
                 on_nonfinite: str = "raise"):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, weight_decouple=weight_decouple,
                        fixed_decay=fixed_decay, ams_bound=ams_bound, eps=eps)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_betas("betas", group["betas"], 2)
        check_nonneg("weight_decay", group["weight_decay"])
        check_positive("eps", group["eps"])

    def _state_keys(self, group):
        keys = ("exp_avg", "exp_avg_sq", "previous_grad")
        return keys + ("max_exp_avg_sq",) if group["ams_bound"] else keys

    def _rule(self, group):
        return DIFFGRAD.variant(coupled=not group["weight_decouple"] and group["weight_decay"] != 0,
                                ams_bound=bool(group["ams_bound"]))

    def _scalars(self, group, step):
        beta1, beta2 = group["betas"]
        return dict(
            **decay_scalars(group),
            beta1c=1.0 - beta1, beta2=beta2, beta2c=1.0 - beta2,
            step_size=group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step),
            eps=group["eps"],
        )
