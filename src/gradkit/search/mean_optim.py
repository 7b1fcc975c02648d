"""Optimizers of a search distribution's mean, as objects a searcher receives (as in evosax).

A searcher that estimates the gradient ``g`` of its objective with respect to its mean (OpenAI-ES, PGPE) hands it
to one of these and moves the mean by ``m ← m − step(g)``: the update rule is a swappable, stateful object with
its own ``state_dict``, not a string option re-implemented in each method. The one Adam on a search mean lives
here.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .._stateful import Stateful
from .._validate import check_betas, check_positive

__all__ = ["SGD", "Adam", "MeanOptimizer", "resolve_mean_optimizer"]


class MeanOptimizer(Stateful):
    """Base: ``step(g)`` returns the increment ``Δ`` of a descent step, ``m ← m − Δ``.

    Args:
        lr: the learning rate; None lets the searcher fill in its own default (which depends on σ₀).
    """

    def __init__(self, lr: float | None = None):
        self.lr = None if lr is None else check_positive("lr", lr)

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr = state["lr"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lr={self.lr})"


class SGD(MeanOptimizer):
    """Plain gradient step ``Δ = η·g`` (PGPE's original update).

    Args:
        lr: η (default: the searcher's).
    """

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        return self.lr * grad


class Adam(MeanOptimizer):
    """Adam (Kingma & Ba, "Adam: A Method for Stochastic Optimization"): ``Δ = η·m̂/(√v̂ + ε)``.

    Args:
        lr: η (default: the searcher's).
        betas: (β₁, β₂), the moment decay rates (default (0.9, 0.999)).
        eps: ε (default 1e-8).
    """

    def __init__(self, lr: float | None = None, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(lr)
        self.betas = check_betas("betas", betas, 2)
        self.eps = check_positive("eps", eps)
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.t = 0

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        if self.m is None:
            self.m, self.v = torch.zeros_like(grad), torch.zeros_like(grad)
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        direction = (self.m / (1 - b1 ** self.t)) / ((self.v / (1 - b2 ** self.t)).sqrt() + self.eps)
        return self.lr * direction

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "t": self.t,
                "m": None if self.m is None else self.m.clone(), "v": None if self.v is None else self.v.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.betas, self.eps, self.t = state["lr"], tuple(state["betas"]), state["eps"], int(state["t"])
        self.m = None if state["m"] is None else state["m"].clone()
        self.v = None if state["v"] is None else state["v"].clone()


MEAN_OPTIMIZERS = {"adam": Adam, "sgd": SGD}


def resolve_mean_optimizer(optimizer: MeanOptimizer | str, default_lr: float, name: str = "optimizer"
                           ) -> MeanOptimizer:
    """A private copy of ``optimizer`` (an object or ``"adam"`` / ``"sgd"``), its lr defaulted to ``default_lr``."""
    if isinstance(optimizer, str):
        if optimizer not in MEAN_OPTIMIZERS:
            raise ValueError(f"{name} must be one of {tuple(MEAN_OPTIMIZERS)} or a "
                             f"gradkit.search.mean_optim.MeanOptimizer, got {optimizer!r}")
        optimizer = MEAN_OPTIMIZERS[optimizer]()
    elif not isinstance(optimizer, MeanOptimizer):
        raise ValueError(f"{name} must be one of {tuple(MEAN_OPTIMIZERS)} or a "
                         f"gradkit.search.mean_optim.MeanOptimizer, got {optimizer!r}")
    else:
        optimizer = copy.deepcopy(optimizer)  # its state belongs to this searcher alone
    if optimizer.lr is None:
        optimizer.lr = check_positive("lr", default_lr)
    return optimizer
