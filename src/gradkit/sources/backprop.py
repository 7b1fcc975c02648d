"""Backprop: the exact gradient by reverse-mode automatic differentiation (``loss.backward()``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .base import Closure, Source, check_loss

__all__ = ["Backprop"]


class Backprop(Source):
    """Exact gradients: calls the closure under ``torch.enable_grad`` and back-propagates.

    ``.grad`` is overwritten, never accumulated. A parameter the loss does not depend on gets ``grad = None``,
    exactly as after ``zero_grad(set_to_none=True); loss.backward()``, so optimizers leave it alone.
    ``create_graph=True`` keeps the graph of the gradient for second-order methods (e.g. AdaHessian).
    """

    paper = "Learning representations by back-propagating errors"

    def __init__(self, model_or_params: torch.nn.Module | Iterable[torch.Tensor], *, create_graph: bool = False):
        super().__init__(model_or_params)
        self.create_graph = bool(create_graph)

    def estimate(self, closure: Closure) -> torch.Tensor:
        params = self.active_params()
        with torch.enable_grad():
            loss = check_loss(closure(), needs_grad=True)
            grads = torch.autograd.grad(loss, params, create_graph=self.create_graph, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g if (g is None or self.create_graph) else g.detach()
        return loss.detach()
