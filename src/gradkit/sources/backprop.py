"""Backprop: the exact gradient by reverse-mode automatic differentiation (``loss.backward()``).

Paper: "Learning representations by back-propagating errors" (Rumelhart, Hinton & Williams, 1986).
Rule: g = ∂L/∂θ, computed by one backward pass through the closure's graph.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .base import Closure, Source, check_loss

__all__ = ["Backprop"]


class Backprop(Source):
    """Exact gradients: calls the closure under ``torch.enable_grad`` and back-propagates.

    ``.grad`` is overwritten, never accumulated. A parameter the loss does not depend on gets ``grad = None``,
    exactly as after ``zero_grad(set_to_none=True); loss.backward()``, so optimizers leave it alone.
    The closure must return the loss without calling ``backward()`` itself (this source does it); a closure that
    does raises ``ValueError`` and leaves ``.grad`` as it was before the call. A closure may return ``B``
    per-sample losses when the source holds one parameter of shape ``[B, ...]``: the gradient is that of their
    sum (row ``b`` gets ``∂loss[b]/∂x[b]``), and ``estimate`` returns the ``B`` losses.

    Args:
        model_or_params: a module (its parameters with ``requires_grad``) or an iterable of tensors.
        create_graph: keep the graph of the gradient (``backward(create_graph=True)``), for second-order
            optimizers that differentiate through ``.grad`` (AdaHessian). Default ``False``.
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"``, see :class:`~gradkit.sources.Source`.
    """

    paper = "Learning representations by back-propagating errors"
    runs_backward = True
    self_guarded = True

    def __init__(self, model_or_params: torch.nn.Module | Iterable[torch.Tensor], *, create_graph: bool = False,
                 on_nonfinite: str = "raise"):
        super().__init__(model_or_params, on_nonfinite=on_nonfinite)
        self.create_graph = bool(create_graph)

    def estimate(self, closure: Closure) -> torch.Tensor:
        params = self.active_params()
        return self._guarded(params, lambda: self._backprop(closure, params))

    def _backprop(self, closure: Closure, params: list[torch.Tensor]) -> torch.Tensor:
        with torch.enable_grad():
            loss = closure()
            # Per-sample losses (one per row of a single parameter [B, ...]): the gradient of their sum, whose
            # row b is ∂loss[b]/∂x[b] when each loss depends on its own row only.
            per_sample = (len(self.params) == 1 and len(params) == 1 and params[0].dim() >= 1
                          and isinstance(loss, torch.Tensor) and loss.dim() == 1 and loss.numel() == params[0].shape[0])
            total = check_loss(loss.sum() if per_sample else loss, needs_grad=True, finite=False)
            if not per_sample:
                loss = total
            if any(p.grad is not None for p in params):
                raise ValueError("the closure called backward() itself; under gk.sources.Backprop it must only "
                                 "return the loss (the source back-propagates, once)")
            grads = torch.autograd.grad(total, params, create_graph=self.create_graph, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g if (g is None or self.create_graph) else g.detach()
        return loss.detach()
