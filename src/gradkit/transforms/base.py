"""The Transform protocol: what happens to the gradient between the source and the optimizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from .._stateful import Stateful

__all__ = ["Transform", "grads_of"]


def grads_of(params: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(parameters that have a gradient, their gradients)."""
    ps = [p for p in params if p.grad is not None]
    return ps, [p.grad for p in ps]


class Transform(Stateful):
    """Edits ``.grad`` of the given parameters in place and returns a dict of statistics.

    Stateful transforms keep their state in plain tensors/numbers and round-trip through ``state_dict()``.
    A transform also works alone, between ``loss.backward()`` and ``optimizer.step()``.
    """

    paper: ClassVar[str] = ""

    def __call__(self, params: Iterable[torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError

