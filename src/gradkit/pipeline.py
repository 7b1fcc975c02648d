"""The five-stage data path: objective → source → transforms → optimizer → controllers."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from ._kernels import all_finite
from ._validate import check_choice
from .control.base import Controller
from .errors import NonFiniteError
from .sources.base import Closure, Source
from .transforms.base import Transform

__all__ = ["Pipeline"]


class Pipeline:
    """One training step through every stage, each swappable.

    ``step(closure)``: ``loss = source.estimate(closure)``; the loss and gradients are checked; each transform
    edits the gradients; ``optimizer.step()``; ``optimizer.zero_grad(set_to_none=True)``; each controller's
    ``after_step(loss)``. Returns the loss (detached).

    ``on_nonfinite``: ``"raise"`` (default) raises :class:`~gradkit.NonFiniteError` when the loss or a gradient
    is NaN/Inf, before any transform, optimizer or controller has run and with the source's state restored;
    ``"skip"`` does the same silently and counts the step in ``skipped``. In both cases parameters and every
    stage's state are exactly as before the call.
    """

    def __init__(self, source: Source, transforms: Sequence[Transform] = (), optimizer: torch.optim.Optimizer = None,
                 controllers: Sequence[Controller] = (), *, on_nonfinite: str = "raise"):
        if not isinstance(source, Source):
            raise ValueError(f"source must be a gradkit Source, got {type(source).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for t in transforms:
            if not callable(t):
                raise ValueError(f"transforms must be callables on parameters, got {type(t).__name__}")
        for c in controllers:
            if not hasattr(c, "after_step"):
                raise ValueError(f"controllers must have after_step(loss), got {type(c).__name__}")
        self.source = source
        self.transforms = list(transforms)
        self.optimizer = optimizer
        self.controllers = list(controllers)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ("raise", "skip"))
        self.steps = 0
        self.skipped = 0
        self.stats: dict[str, Any] = {}

    @property
    def should_stop(self) -> bool:
        """True once any controller asks training to stop."""
        return any(getattr(c, "should_stop", False) for c in self.controllers)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self, closure: Closure) -> torch.Tensor:
        source_state = copy.deepcopy(self.source.state_dict())
        try:
            loss = self.source.estimate(closure)
            grads = [p.grad for p in self._params() if p.grad is not None]
            if not all_finite(grads):
                raise NonFiniteError("a gradient is NaN or Inf; nothing was updated")
        except NonFiniteError:
            # The source may have advanced its random stream: put it back, so a skip changes nothing.
            self.source.load_state_dict(source_state)
            self.optimizer.zero_grad(set_to_none=True)
            if self.on_nonfinite == "raise":
                raise
            self.skipped += 1
            return torch.tensor(float("nan"))
        params = self._params()
        stats: dict[str, Any] = {}
        for t in self.transforms:
            out = t(params)
            if out:
                name = type(t).__name__
                stats.update({f"{name}/{k}": v for k, v in out.items()})
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for c in self.controllers:
            c.after_step(loss)
        self.steps += 1
        self.stats = stats
        return loss

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "source": self.source.state_dict(),
            "transforms": [t.state_dict() if hasattr(t, "state_dict") else {} for t in self.transforms],
            "optimizer": self.optimizer.state_dict(),
            "controllers": [c.state_dict() if hasattr(c, "state_dict") else {} for c in self.controllers],
            "steps": self.steps,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["transforms"]) != len(self.transforms) or len(state["controllers"]) != len(self.controllers):
            raise ValueError("state_dict was saved from a Pipeline with a different number of stages")
        self.source.load_state_dict(state["source"])
        for t, s in zip(self.transforms, state["transforms"]):
            if hasattr(t, "load_state_dict"):
                t.load_state_dict(s)
        self.optimizer.load_state_dict(state["optimizer"])
        for c, s in zip(self.controllers, state["controllers"]):
            if hasattr(c, "load_state_dict"):
                c.load_state_dict(s)
        self.steps = int(state["steps"])
        self.skipped = int(state["skipped"])
