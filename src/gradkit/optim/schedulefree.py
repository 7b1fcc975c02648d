"""Schedule-Free SGD and AdamW: no learning-rate schedule, an average that is good at any time.

Paper: "The Road Less Scheduled" (Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, 2024).

    y = (1−β)·z + β·x,   z ← z − γ·∇f(y),   x ← (1−c)·x + c·z,   c = w_t / Σ_{i≤t} w_i,   w_t = t^r · γ_max^p

The gradient is taken at the interpolation y; x, a weighted average of the z iterates, is the point to evaluate.
As in the authors' ``schedulefree`` package the parameters hold y during training and x is never stored:
``eval()`` moves them to x and ``train()`` back to y (x = (y − (1−β)·z)/β). The AdamW variant divides the
gradient by Adam's bias-corrected √v + ε before the step; weight decay is evaluated at y in both variants.
``warmup_steps`` warms γ up linearly; during warm-up the average weights steps by γ_max^``weight_lr_power``.

Differences from the reference: the optimizer starts in train mode (before the first step x = y = z, so the
mode is unobservable, and ``Pipeline``/plain loops need no ``train()`` call); ``step()`` in eval mode raises
``RuntimeError``, as the reference raises. The mode is per param group and travels in ``state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch

from .._kernels import Elementwise
from .._validate import check_betas, check_int, check_nonneg, check_positive, check_range
from ._base import Optimizer, ParamsT

__all__ = ["ScheduleFreeAdamW", "ScheduleFreeSGD"]


# ``decayed`` (static) drops the weight-decay term when it is zero: under "foreach" each term is a pass over memory.
def _sf_sgd(p, g, z, *, decay, ckp1, ylr, lr, decayed=True):
    if decayed:
        g = g + p * decay  # weight decay at y, before y moves
    p.lerp_(z, ckp1)
    p.add_(g * ylr)
    z.sub_(g * lr)


def _sf_adamw(p, g, z, v, *, beta2c, bc2, eps, decay, ckp1, ylr, lr, decayed=True):
    v.lerp_(g.square(), beta2c)
    g = g / ((v / bc2).sqrt() + eps)
    if decayed:
        g = g + p * decay
    p.lerp_(z, ckp1)
    p.add_(g * ylr)
    z.sub_(g * lr)


def _swap(p, z, *, w):
    p.lerp_(z, w)


SF_SGD = Elementwise(_sf_sgd, "schedulefree_sgd")
SF_ADAMW = Elementwise(_sf_adamw, "schedulefree_adamw")
SWAP = Elementwise(_swap, "schedulefree_swap")


class _ScheduleFree(Optimizer):
    _buffers: tuple[str, ...] = ()

    def _beta(self, group: dict[str, Any]) -> float:
        raise NotImplementedError

    def _check_common(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_int("warmup_steps", group["warmup_steps"])
        check_nonneg("r", group["r"])
        check_nonneg("weight_lr_power", group["weight_lr_power"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # A group added later joins in the optimizer's current mode (its parameters hold no z yet, so either
        # mode is consistent; the current one keeps step() and train()/eval() uniform across groups).
        if self.param_groups and "train_mode" not in param_group:
            param_group = {**param_group, "train_mode": self.param_groups[0]["train_mode"]}
        super().add_param_group(param_group)

    @property
    def training(self) -> bool:
        """True in train mode (parameters hold y), False in eval mode (parameters hold the average x)."""
        return all(g["train_mode"] for g in self.param_groups)

    def _swap_mode(self, to_train: bool) -> None:
        mode = "loop" if self.kernel == "loop" else "foreach"  # one lerp: nothing for a compiler to fuse
        with torch.no_grad():
            for group in self.param_groups:
                if group["train_mode"] == to_train:
                    continue
                beta = self._beta(group)
                ps = [p for p in group["params"] if "z" in self.state.get(p, {})]
                zs = [self.state[p]["z"] for p in ps]
                SWAP(mode, [ps, zs], dict(w=1.0 - beta if to_train else 1.0 - 1.0 / beta))
                group["train_mode"] = to_train

    def eval(self) -> None:
        """Move the parameters to the averaged point x (for evaluation and checkpoints)."""
        self._swap_mode(False)

    def train(self) -> None:
        """Move the parameters back to the interpolated point y, where gradients are taken."""
        self._swap_mode(True)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if not self.training:
            raise RuntimeError(
                f"{type(self).__name__}.step() called in eval mode: the parameters hold the averaged point x. "
                "Call optimizer.train() before training steps and optimizer.eval() before evaluation."
            )
        return super().step(closure)

    def _schedule(self, group: dict[str, Any]) -> tuple[float, float, int]:
        """Advance the group's warm-up and averaging weights; returns (lr, c_{k+1}, k)."""
        k = group["k"]
        warmup = group["warmup_steps"]
        lr = group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
        group["scheduled_lr"] = lr
        lr_max = group["lr_max"] = max(lr, group["lr_max"])
        weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
        weight_sum = group["weight_sum"] = group["weight_sum"] + weight
        ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
        group["k"] = k + 1
        return lr, ckp1, k

    def _step(self, active):
        for group, params in active:
            # The averaging weights advance even for a group without gradients this step, as in the reference.
            lr, ckp1, k = self._schedule(group)
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone(memory_format=torch.preserve_format)
                    for name in self._buffers:
                        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._run(group, params, lr, ckp1, k)

    def _run(self, group, params, lr, ckp1, k) -> None:
        raise NotImplementedError


class ScheduleFreeSGD(_ScheduleFree):
    """Schedule-Free SGD (with momentum β = ``momentum`` in the interpolation). Call ``eval()`` to evaluate.

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        lr: the learning rate γ. Default 1.0.
        momentum: β, the interpolation y = (1 − β)·z + β·x (must be > 0). Default 0.9.
        weight_decay: λ, added to the gradient at y. Default 0.
        warmup_steps, r, weight_lr_power, kernel, on_nonfinite: as for :class:`ScheduleFreeAdamW`.
    """

    paper = "The Road Less Scheduled"

    def __init__(self, params: ParamsT, lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0, *,
                 kernel: str = "auto", on_nonfinite: str = "raise"):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, k=0, train_mode=True, weight_sum=0.0, lr_max=-1.0,
                        scheduled_lr=0.0)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        self._check_common(group)
        # β = 0 would make x unrecoverable from y and z (eval() divides by β).
        check_range("momentum", group["momentum"], 0.0, 1.0, low_open=True, high_open=True)

    def _beta(self, group):
        return group["momentum"]

    def _run(self, group, params, lr, ckp1, k):
        beta = group["momentum"]
        zs = [self.state[p]["z"] for p in params]
        rule = SF_SGD.variant(decayed=group["weight_decay"] != 0)
        rule(self.kernel, [params, [p.grad for p in params], zs],
             dict(decay=group["weight_decay"], ckp1=ckp1, ylr=lr * (beta * (1.0 - ckp1) - 1.0), lr=lr))


class ScheduleFreeAdamW(_ScheduleFree):
    """Schedule-Free AdamW: the schedule-free step on Adam-normalised gradients. Call ``eval()`` to evaluate.

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        lr: the learning rate γ. Default 0.0025.
        betas: (β, β2): β interpolates y = (1 − β)·z + β·x, β2 is the decay of Adam's v. Default (0.9, 0.999).
        eps: ε in Adam's denominator. Default 1e-8.
        weight_decay: λ, evaluated at y. Default 0.
        warmup_steps: the number of steps over which γ warms up linearly. Default 0.
        r: the power of t in the averaging weight w_t = t^r·γ_max^p. Default 0.
        weight_lr_power: p, the power of the largest learning rate γ_max in w_t. Default 2.0.
        kernel, on_nonfinite: how the update runs and what a NaN/Inf gradient does, as for
            :class:`~gradkit.optim.Optimizer` (defaults ``"auto"`` and ``"raise"``).
    """

    paper = "The Road Less Scheduled"
    _buffers = ("exp_avg_sq",)

    def __init__(self, params: ParamsT, lr: float = 0.0025, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, *, kernel: str = "auto", on_nonfinite: str = "raise"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, k=0, train_mode=True, weight_sum=0.0, lr_max=-1.0,
                        scheduled_lr=0.0)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        self._check_common(group)
        check_betas("betas", group["betas"], 2)
        if group["betas"][0] == 0:
            raise ValueError("betas[0] must lie in (0, 1) for Schedule-Free (eval() divides by it), got 0")
        check_positive("eps", group["eps"])

    def _beta(self, group):
        return group["betas"][0]

    def _run(self, group, params, lr, ckp1, k):
        beta1, beta2 = group["betas"]
        st = [self.state[p] for p in params]
        rule = SF_ADAMW.variant(decayed=group["weight_decay"] != 0)
        rule(self.kernel, [params, [p.grad for p in params], [s["z"] for s in st], [s["exp_avg_sq"] for s in st]],
             dict(beta2c=1.0 - beta2, bc2=1.0 - beta2 ** (k + 1), eps=group["eps"], decay=group["weight_decay"],
                  ckp1=ckp1, ylr=lr * (beta1 * (1.0 - ckp1) - 1.0), lr=lr))

