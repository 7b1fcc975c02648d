"""Gravity: a kinematic optimizer whose step shrinks where the gradient is large relative to its tensor's peak.

Paper: "Gravity Optimizer: a Kinematic Approach on Optimization in Deep Learning" (Bahrami & Zadeh, 2021).

    m = 1/max|g|,   ζ = g / (1 + (g/m)²),   β_t = (β·t + 1)/(t + 2),   v ← β_t·v + (1−β_t)·ζ,   p ← p − lr·v

with v initialised from N(0, (α/lr)²). The initial draw uses torch's global generator (as the reference
does), so ``torch.manual_seed`` before the first step makes a run reproducible. Names and defaults follow
``pytorch-optimizer``'s ``Gravity`` (the parity oracle). There is no weight decay in the method.
"""

from __future__ import annotations

from typing import Any

import torch

from .._kernels import Elementwise
from .._validate import check_positive, check_range
from ._base import Optimizer, ParamsT

__all__ = ["Gravity"]


def _gravity(p, g, v, m, *, beta_c, lr):
    # m is 1/max|g| per tensor (a 0-d tensor), divided by as the reference does so both round alike.
    zeta = g / (g / m).square().add_(1.0)
    v.lerp_(zeta, beta_c)
    p.sub_(v * lr)


GRAVITY = Elementwise(_gravity, "gravity")


class Gravity(Optimizer):
    """Gravity: velocity averaged from gradients damped by their size relative to the tensor's max."""

    paper = "Gravity Optimizer: a Kinematic Approach on Optimization in Deep Learning"

    def __init__(self, params: ParamsT, lr: float = 1e-2, alpha: float = 0.01, beta: float = 0.9, *,
                 kernel: str = "auto", on_nonfinite: str = "ignore"):
        defaults = dict(lr=lr, alpha=alpha, beta=beta)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        # lr > 0: the velocity's initial scale is α/lr.
        check_positive("lr", group["lr"])
        check_range("alpha", group["alpha"], 0.0, 1.0)
        check_range("beta", group["beta"], 0.0, 1.0)

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        buckets: dict[int, list[torch.Tensor]] = {}
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["v"] = torch.empty_like(p).normal_(mean=0.0, std=group["alpha"] / group["lr"])
            buckets.setdefault(state["step"], []).append(p)
        for step, ps in buckets.items():
            step += 1
            for p in ps:
                self.state[p]["step"] = step
            grads = [p.grad for p in ps]
            inv_max = torch._foreach_reciprocal(torch._foreach_norm(grads, float("inf")))
            beta_t = (group["beta"] * step + 1) / (step + 2)
            GRAVITY(self.kernel, [ps, grads, [self.state[p]["v"] for p in ps], inv_max],
                    dict(beta_c=1.0 - beta_t, lr=group["lr"]))
