"""The Transform protocol: what happens to the gradient between the source and the optimizer."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from .._stateful import Stage

__all__ = ["Transform", "grads_of"]


def grads_of(params: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(parameters that have a gradient, their gradients).

    Args:
        params: the parameters.
    """
    ps = [p for p in params if p.grad is not None]
    return ps, [p.grad for p in ps]


def _recording(call: Any) -> Any:
    """Wrap a transform's ``__call__`` so that its returned statistics are also what ``stats()`` reports."""

    @functools.wraps(call)
    def recorded(self: Transform, params: Iterable[torch.Tensor], *args: Any, **kwargs: Any) -> dict[str, Any]:
        out = call(self, params, *args, **kwargs)
        self._last_stats = out if isinstance(out, dict) else {}
        return out

    recorded._gradkit_records_stats = True  # type: ignore[attr-defined]
    return recorded


class Transform(Stage):
    """Edits ``.grad`` of the given parameters and returns a dict of statistics.

    Called alone (between ``loss.backward()`` and ``optimizer.step()``) a transform returns its statistics; in a
    :class:`gradkit.Pipeline` the same dict is reported under the stage's name. Either way ``stats()`` returns the
    statistics of the last call (the one protocol shared with controllers, see :class:`gradkit._stateful.Stage`):
    a subclass's ``__call__`` is recorded automatically.

    Stateful transforms keep their state in plain tensors/numbers and round-trip through ``state_dict()``.

    Gradients that carry a graph (``Backprop(..., create_graph=True)``, needed by AdaHessian) are replaced out of
    place rather than edited in place, so autograd can still differentiate through them; plain gradients keep
    the in-place fast path.

    Class attributes:
        keeps_finite: True when finite gradients stay finite through the transform (clipping and measuring do;
            adding a filtered signal may overflow). A :class:`gradkit.Pipeline` that has checked the gradients
            lets the optimizer skip its own check only when every transform keeps them finite.
    """

    paper: ClassVar[str] = ""
    keeps_finite: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is not None and not getattr(call, "_gradkit_records_stats", False):
            cls.__call__ = _recording(call)  # type: ignore[method-assign]

    def __call__(self, params: Iterable[torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError
