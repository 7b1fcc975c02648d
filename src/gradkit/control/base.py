"""The Controller protocol: what trains and when."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

__all__ = ["Controller"]


class Controller:
    """Called after every optimizer step with the loss; may freeze parameters or ask training to stop."""

    paper: ClassVar[str] = ""
    should_stop: bool = False

    def after_step(self, loss: torch.Tensor | float) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")
