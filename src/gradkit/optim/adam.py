"""Adam and AdamW, with the AMSGrad option.

Papers: "Adam: A Method for Stochastic Optimization" (Kingma & Ba, 2015); "Decoupled Weight Decay
Regularization" (Loshchilov & Hutter, 2019); "On the Convergence of Adam and Beyond" (Reddi et al., 2018).

    m ← β1·m + (1−β1)·g,   v ← β2·v + (1−β2)·g²,   (AMSGrad: v̂ ← max(v̂, v), used in place of v)
    p ← p·(1 − lr·λ) − lr/(1−β1^t) · m / (√v / √(1−β2^t) + ε)

``AdamW`` decays the weights directly (decoupled, λ = ``weight_decay``); ``Adam`` adds λ·p to the gradient
instead (L2 regularisation), as ``torch.optim.Adam`` does. Defaults follow ``torch.optim``; the tests check
parity with ``torch.optim.AdamW``/``Adam`` for every kernel.
"""

from __future__ import annotations

import math
from typing import Any

from .._kernels import Elementwise, fused_adam
from .._validate import check_betas, check_nonneg, check_positive
from ._base import ElementwiseOptimizer, ParamsT

__all__ = ["Adam", "AdamW"]


def _adam(p, g, m, v, *vmax, decay, l2, beta1c, beta2c, step_size, bc2_sqrt, eps, amsgrad=False, coupled=False):
    if coupled:  # L2 regularisation: the decay enters the gradient (and so the moments)
        g = g + p * l2
    p.mul_(decay)
    m.lerp_(g, beta1c)
    v.lerp_(g.square(), beta2c)
    if amsgrad:
        vmax[0].copy_(vmax[0].maximum(v))
        v = vmax[0]
    denom = v.sqrt().div_(bc2_sqrt).add_(eps)
    p.sub_((m / denom).mul_(step_size))


ADAM = Elementwise(_adam, "adam")


class AdamW(ElementwiseOptimizer):
    """Adam with decoupled weight decay (and ``amsgrad=True`` for AMSGrad).

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        lr: the learning rate lr (α in the paper). Default 1e-3.
        betas: (β1, β2), decay rates of the first and second moment estimates m and v. Default (0.9, 0.999).
        eps: ε, added to √v̂ in the denominator for numerical stability. Default 1e-8.
        weight_decay: λ, decoupled weight decay: p ← p·(1 − lr·λ) each step. Default 1e-2.
        amsgrad: use AMSGrad's running maximum v̂ = max(v̂, v) in place of v. Default False.
        kernel, on_nonfinite: how the update runs and what a NaN/Inf gradient does, as for
            :class:`~gradkit.optim.Optimizer` (defaults ``"auto"`` and ``"raise"``).
    """

    paper = "Adam: A Method for Stochastic Optimization; Decoupled Weight Decay Regularization"
    _coupled = False

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 kernel: str = "auto", on_nonfinite: str = "raise"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_betas("betas", group["betas"], 2)
        check_positive("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])

    def _foreign_group_keys(self) -> dict[str, Any]:
        # torch >= 2.6 stores whether the decay is decoupled: a torch.optim.Adam(decoupled_weight_decay=True)
        # state belongs in AdamW, and the reverse.
        return {**super()._foreign_group_keys(), "decoupled_weight_decay": not self._coupled}

    def _state_keys(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _rule(self, group):
        # A zero decay is a static no-op: the variant without it skips a pass in the foreach/loop kernels.
        return ADAM.variant(amsgrad=bool(group["amsgrad"]), coupled=self._coupled and group["weight_decay"] != 0)

    def _fused(self, group, lists, step):
        # kernel="auto": torch's fused Adam/AdamW kernel (same algorithm, nothing to compile) where it applies.
        beta1, beta2 = group["betas"]
        return fused_adam(lists, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                          weight_decay=group["weight_decay"], step=step, amsgrad=bool(group["amsgrad"]),
                          decoupled=not self._coupled)

    def _scalars(self, group, step):
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        return dict(
            decay=1.0 if self._coupled else 1.0 - lr * wd,
            l2=wd if self._coupled else 0.0,
            beta1c=1.0 - beta1,
            beta2c=1.0 - beta2,
            step_size=lr / (1.0 - beta1**step),
            bc2_sqrt=math.sqrt(1.0 - beta2**step),
            eps=group["eps"],
        )


class Adam(AdamW):
    """Adam with L2 regularisation folded into the gradient (``torch.optim.Adam`` semantics).

    Args:
        weight_decay: λ, L2 regularisation: λ·p is added to the gradient (and so enters the moments). Default 0.
        params, lr, betas, eps, amsgrad, kernel, on_nonfinite: as for :class:`AdamW`.
    """

    paper = "Adam: A Method for Stochastic Optimization"
    _coupled = True

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 kernel: str = "auto", on_nonfinite: str = "raise"):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, kernel=kernel, on_nonfinite=on_nonfinite)
