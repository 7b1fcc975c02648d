"""The Controller protocol: what trains and when."""

from __future__ import annotations

from typing import ClassVar

import torch

from .._stateful import Stateful

__all__ = ["Controller"]


class Controller(Stateful):
    """Called after every optimizer step with the loss; may freeze parameters or ask training to stop."""

    paper: ClassVar[str] = ""
    should_stop: bool = False

    def after_step(self, loss: torch.Tensor | float) -> None:
        raise NotImplementedError

