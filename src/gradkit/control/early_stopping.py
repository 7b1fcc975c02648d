"""Early stopping on a monitored value.

Rule: the value improves when it beats the best so far by more than ``min_delta`` (lower for ``mode="min"``);
training stops after ``patience`` consecutive checks without improvement.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._validate import check_choice, check_int, check_nonneg
from .base import Controller

__all__ = ["EarlyStopping"]


class EarlyStopping(Controller):
    """Stop when a monitored value has not improved by ``min_delta`` for ``patience`` checks.

    Feed it either through :meth:`update` (e.g. a validation loss after each evaluation) or as a Pipeline
    controller, where :meth:`after_step` monitors the training loss of every step. ``best``, ``best_step``
    and ``bad_checks`` are public. A NaN value counts as no improvement.

    Args:
        patience: the number of consecutive checks without improvement after which training stops (≥ 1).
        min_delta: the least change that counts as an improvement. Default 0.
        mode: ``'min'`` (lower is better, e.g. a loss) or ``'max'``. Default 'min'.
    """

    def __init__(self, patience: int, min_delta: float = 0.0, mode: str = "min"):
        self.patience = check_int("patience", patience, 1)
        self.min_delta = check_nonneg("min_delta", min_delta)
        self.mode = check_choice("mode", mode, ("min", "max"))
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_step = 0
        self.checks = 0
        self.bad_checks = 0
        self.should_stop = False

    def update(self, value: torch.Tensor | float) -> bool:
        """Record one value; returns ``should_stop``."""
        v = float(value)
        self.checks += 1
        improved = v < self.best - self.min_delta if self.mode == "min" else v > self.best + self.min_delta
        if improved:
            self.best, self.best_step, self.bad_checks = v, self.checks, 0
        else:
            self.bad_checks += 1
            if self.bad_checks >= self.patience:
                self.should_stop = True
        return self.should_stop

    def after_step(self, loss: torch.Tensor | float) -> None:
        self.update(loss)

    def stats(self) -> dict[str, float]:
        return {"best": self.best, "bad_checks": float(self.bad_checks)}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "checks": self.checks,
                "bad_checks": self.bad_checks, "should_stop": self.should_stop}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = float(state["best"]), int(state["best_step"])
        self.checks, self.bad_checks = int(state["checks"]), int(state["bad_checks"])
        self.should_stop = bool(state["should_stop"])

    def __repr__(self) -> str:
        return f"EarlyStopping(patience={self.patience}, min_delta={self.min_delta}, mode={self.mode!r})"
