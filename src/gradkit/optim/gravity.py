"""Gravity: a kinematic optimizer whose step shrinks where the gradient is large relative to its tensor's peak.

Paper: "Gravity Optimizer: a Kinematic Approach on Optimization in Deep Learning" (Bahrami & Zadeh, 2021).

    m = 1/max|g|,   ζ = g / (1 + (g/m)²),   β_t = (β·t + 1)/(t + 2),   v ← β_t·v + (1−β_t)·ζ,   p ← p − lr·v

with v initialised from N(0, (α/lr)²) at a parameter's first step. With ``seed`` (default 0) the draw for the
i-th parameter (in param-group order) comes from a generator seeded by (seed, i): reproducible, independent of
the global RNG and identical on every rank of a data-parallel job. ``seed=None`` draws from torch's global
generator, as the reference does. Names and defaults follow ``pytorch-optimizer``'s ``Gravity`` (the parity
oracle). There is no weight decay in the method.
"""

from __future__ import annotations

from typing import Any

import torch

from .._kernels import Elementwise
from .._validate import check_int, check_positive, check_range
from ._base import Optimizer, ParamsT

__all__ = ["Gravity"]


def _gravity(p, g, v, m, *, beta_c, lr):
    # m is 1/max|g| per tensor (a 0-d tensor), divided by as the reference does so both round alike.
    zeta = g / (g / m).square().add_(1.0)
    v.lerp_(zeta, beta_c)
    p.sub_(v * lr)


GRAVITY = Elementwise(_gravity, "gravity")


class Gravity(Optimizer):
    """Gravity: velocity averaged from gradients damped by their size relative to the tensor's max.

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        lr: the learning rate l (must be > 0: the initial velocity's scale is α/l). Default 1e-2.
        alpha: α, the standard deviation scale of the initial velocity v ~ N(0, (α/l)²), in [0, 1]. Default 0.01.
        beta: β, the base of the velocity's averaging weight β_t = (β·t + 1)/(t + 2), in [0, 1]. Default 0.9.
        seed: seed of the initial-velocity draws (None: torch's global generator, as the reference). Default 0.
        kernel, on_nonfinite: how the update runs and what a NaN/Inf gradient does, as for
            :class:`~gradkit.optim.Optimizer` (defaults ``"auto"`` and ``"raise"``).
    """

    paper = "Gravity Optimizer: a Kinematic Approach on Optimization in Deep Learning"

    def __init__(self, params: ParamsT, lr: float = 1e-2, alpha: float = 0.01, beta: float = 0.9,
                 seed: int | None = 0, *, kernel: str = "auto", on_nonfinite: str = "raise"):
        if seed is not None:
            check_int("seed", seed)
        defaults = dict(lr=lr, alpha=alpha, beta=beta)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)
        self.seed = seed

    def _initial_velocity(self, p: torch.Tensor, std: float) -> torch.Tensor:
        if self.seed is None:
            return torch.empty_like(p).normal_(mean=0.0, std=std)
        index = next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is p)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.empty(p.shape, dtype=p.dtype).normal_(mean=0.0, std=std, generator=gen).to(p.device)

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
                state["v"] = self._initial_velocity(p, group["alpha"] / group["lr"])
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
