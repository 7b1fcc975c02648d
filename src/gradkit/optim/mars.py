"""MARS: variance-reduced adaptive updates (the AdamW and Lion forms).

Paper: "MARS: Unleashing the Power of Variance Reduction for Training Large Models" (Yuan et al., 2024).

    c = g_t + γ·β1/(1−β1)·(g_t − g_{t−1}),   c ← c / max(1, ‖c‖)        (per tensor)
    m ← β1·m + (1−β1)·c,   v ← β2·v + (1−β2)·c²
    AdamW form: p ← p·(1 − lr·λ) − lr · (m/(1−β1^t)) / ((√v + ε)/√(1−β2^t));   Lion form: p ← p·(1 − lr·λ) − lr·sign(m)

This is the "approximate" MARS of the paper: g_{t−1} is the previous step's stochastic gradient (the paper's
MARS-approx), so no second gradient evaluation is needed. Names, defaults and formulas follow
``pytorch-optimizer``'s ``MARS`` (the parity oracle), including its placement of ε before the bias correction.

**1-D parameters** (biases, norm gains): as in the reference and the authors' code, with ``optimize_1d=False``
(the default) they are *not* variance-reduced; they get plain AdamW with their own ``lr_1d``, ``betas_1d`` and
``weight_decay_1d``, and keep no previous-gradient buffer. ``lr_1d`` follows ``lr``'s schedule: the 1-D rate
is ``lr · lr_1d / lr₀`` where ``lr₀`` is the constructor's ``lr``. ``optimize_1d=True`` sends every tensor
through MARS. Weight decay is decoupled (``fixed_decay=True``: multiply by ``1 − λ`` instead of ``1 − lr·λ``);
the reference's coupled option is not offered, because there it only changes the stored previous gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._kernels import Elementwise
from .._validate import check_betas, check_choice, check_nonneg, check_positive
from ._base import Optimizer, ParamsT

__all__ = ["MARS"]

MARS_TYPES = ("adamw", "lion")


def _correction(last, g, *, coef):
    # c = (g − g_prev)·coef + g, written into the previous-gradient buffer (it is refilled with g below);
    # (last − g)·(−coef) equals (g − last)·coef exactly, so this rounds like the reference.
    last.sub_(g).mul_(-coef).add_(g)


def _mars(p, g, c, m, clip, *v, decay, beta1c, beta2, beta2c, bc1, bc2_sqrt, eps, lr, lion=False):
    c.div_(clip)
    m.lerp_(c, beta1c)
    p.mul_(decay)
    if lion:
        p.sub_(m.sign().mul_(lr))
    else:
        v[0].mul_(beta2).add_(c.square().mul_(beta2c))
        denom = (v[0] + 1e-15).sqrt_().add_(eps).div_(bc2_sqrt).mul_(bc1)
        p.sub_((m / denom).mul_(lr))
    c.copy_(g)


def _adamw_1d(p, g, m, v, *, decay, beta1c, beta2, beta2c, bc1, bc2_sqrt, eps, lr):
    m.lerp_(g, beta1c)
    v.mul_(beta2).add_(g.square().mul_(beta2c))
    denom = (v + 1e-15).sqrt_().add_(eps).div_(bc2_sqrt).mul_(bc1)
    p.mul_(decay)
    p.sub_((m / denom).mul_(lr))


CORRECTION = Elementwise(_correction, "mars_correction")
MARS_RULE = Elementwise(_mars, "mars")
ADAMW_1D = Elementwise(_adamw_1d, "mars_adamw_1d")


class MARS(Optimizer):
    """MARS (approximate form) with AdamW or Lion preconditioning; 1-D tensors get AdamW by default.

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        lr: the learning rate η of the MARS step. Default 3e-3.
        betas: (β1, β2), moment decay rates (β1 also scales the variance-reduction term). Default (0.95, 0.99).
        gamma: γ, the weight of the gradient-correction term g_t − g_{t−1}. Default 0.025.
        mars_type: the preconditioning, ``'adamw'`` or ``'lion'``. Default 'adamw'.
        optimize_1d: also send 1-D tensors through MARS (else plain AdamW with the ``*_1d`` settings). Default False.
        lr_1d: the AdamW learning rate of 1-D tensors (follows ``lr``'s schedule). Default 3e-3.
        betas_1d: AdamW's (β1, β2) for 1-D tensors. Default (0.9, 0.95).
        weight_decay: λ, decoupled, for tensors MARS handles. Default 0.
        weight_decay_1d: λ for 1-D tensors under AdamW. Default 0.1.
        fixed_decay: decay by λ instead of lr·λ. Default False.
        eps: ε in the denominator. Default 1e-8.
        kernel, on_nonfinite: how the update runs and what a NaN/Inf gradient does, as for
            :class:`~gradkit.optim.Optimizer` (defaults ``"auto"`` and ``"raise"``).
    """

    paper = "MARS: Unleashing the Power of Variance Reduction for Training Large Models"

    def __init__(self, params: ParamsT, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.99),
                 gamma: float = 0.025, mars_type: str = "adamw", optimize_1d: bool = False, lr_1d: float = 3e-3,
                 betas_1d: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.0,
                 weight_decay_1d: float = 0.1, fixed_decay: bool = False, eps: float = 1e-8, *,
                 kernel: str = "auto", on_nonfinite: str = "raise"):
        check_nonneg("lr", lr)
        check_nonneg("lr_1d", lr_1d)
        defaults = dict(lr=lr, betas=betas, gamma=gamma, mars_type=mars_type, optimize_1d=optimize_1d,
                        lr_1d=lr_1d, lr_1d_factor=lr_1d / lr if lr > 0 else 1.0, betas_1d=betas_1d,
                        weight_decay=weight_decay, weight_decay_1d=weight_decay_1d, fixed_decay=fixed_decay,
                        eps=eps)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_nonneg("lr_1d", group["lr_1d"])
        check_betas("betas", group["betas"], 2)
        check_betas("betas_1d", group["betas_1d"], 2)
        check_nonneg("gamma", group["gamma"])
        check_choice("mars_type", group["mars_type"], MARS_TYPES)
        check_nonneg("weight_decay", group["weight_decay"])
        check_nonneg("weight_decay_1d", group["weight_decay_1d"])
        check_positive("eps", group["eps"])

    def _scalars(self, group: dict[str, Any], step: int, mixed: bool) -> dict[str, float]:
        beta1, beta2 = group["betas"] if mixed else group["betas_1d"]
        lr = group["lr"] * (1.0 if mixed else group["lr_1d_factor"])
        wd = group["weight_decay"] if mixed else group["weight_decay_1d"]
        return dict(decay=1.0 - wd * (1.0 if group["fixed_decay"] else lr), beta1c=1.0 - beta1, beta2=beta2,
                    beta2c=1.0 - beta2, bc1=1.0 - beta1**step, bc2_sqrt=math.sqrt(1.0 - beta2**step),
                    eps=group["eps"], lr=lr)

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lion = group["mars_type"] == "lion"
        buckets: dict[tuple[bool, int], list[torch.Tensor]] = {}
        for p in params:
            mixed = bool(group["optimize_1d"]) or p.ndim >= 2
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if mixed:
                    state["last_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if not (mixed and lion):
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif mixed and "last_grad" not in state:  # optimize_1d switched on mid-run
                state["last_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buckets.setdefault((mixed, state["step"]), []).append(p)
        for (mixed, step), ps in buckets.items():
            step += 1
            states = [self.state[p] for p in ps]
            for st in states:
                st["step"] = step
            grads = [p.grad for p in ps]
            sc = self._scalars(group, step, mixed)
            m = [st["exp_avg"] for st in states]
            if not mixed:
                ADAMW_1D(self.kernel, [ps, grads, m, [st["exp_avg_sq"] for st in states]], sc)
                continue
            beta1 = group["betas"][0]
            last = [st["last_grad"] for st in states]
            CORRECTION(self.kernel, [last, grads], dict(coef=group["gamma"] * beta1 / (1.0 - beta1)))
            clip = [n.clamp_min(1.0) for n in torch._foreach_norm(last)]
            lists = [ps, grads, last, m, clip]
            if not lion:
                lists.append([st["exp_avg_sq"] for st in states])
            MARS_RULE.variant(lion=lion)(self.kernel, lists, sc)
