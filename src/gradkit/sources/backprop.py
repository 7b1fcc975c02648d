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
    A closure may return ``B`` per-sample losses when the source holds one parameter of shape ``[B, ...]``:
    the gradient is that of their sum, and ``estimate`` returns the ``B`` losses.

    Args:
        model_or_params: the module or tensors to differentiate.
        create_graph: keep the graph of the gradient (default False).
    """

    paper = "Learning representations by back-propagating errors"

    def __init__(self, model_or_params: torch.nn.Module | Iterable[torch.Tensor], *, create_graph: bool = False):
        super().__init__(model_or_params)
        self.create_graph = bool(create_graph)

    def estimate(self, closure: Closure) -> torch.Tensor:
        params = self.active_params()
        with torch.enable_grad():
            loss = closure()
            # Per-sample losses (one per row of a single parameter [B, ...]): the gradient of their sum, whose
            # row b is ∂loss[b]/∂x[b] when each loss depends on its own row only.
            per_sample = (len(self.params) == 1 and len(params) == 1 and params[0].dim() >= 1
                          and isinstance(loss, torch.Tensor) and loss.dim() == 1 and loss.numel() == params[0].shape[0])
            total = check_loss(loss.sum() if per_sample else loss, needs_grad=True)
            if not per_sample:
                loss = total
            grads = torch.autograd.grad(total, params, create_graph=self.create_graph, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g if (g is None or self.create_graph) else g.detach()
        return loss.detach()
