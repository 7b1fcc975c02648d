"""The Controller protocol: what trains and when."""

from __future__ import annotations

from typing import ClassVar

import torch

from .._stateful import Stage

__all__ = ["Controller"]


class Controller(Stage):
    """Called after every optimizer step with the loss; may freeze parameters or ask training to stop.

    Statistics follow the stage protocol: ``stats()`` returns the values of the last step
    (see :class:`gradkit._stateful.Stage`).

    Class attributes (read by :class:`gradkit.Pipeline` at construction):
        needs_backward: the controller observes gradients through autograd hooks, so the source must run a
            backward pass (``Source.runs_backward``).
        needs_transform: the controller observes ``.grad`` as a transform, so the same object must also be among
            the Pipeline's transforms.
    """

    paper: ClassVar[str] = ""
    should_stop: bool = False
    needs_backward: bool = False
    needs_transform: bool = False

    def after_step(self, loss: torch.Tensor | float) -> None:
        raise NotImplementedError
