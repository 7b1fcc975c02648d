"""Fused reductions over all gradients, shared by the clipping transforms."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from .._kernels import group_by_device_dtype, sq_norms

__all__ = ["global_norm", "has_graph", "measure", "replace_grads", "scale_", "scale_grads"]

# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); the clipping transforms use the same guard so that
# ClipNorm matches it exactly and a zero gradient never divides by zero.
NORM_EPS = 1e-6


def global_norm(grads: Sequence[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients taken together, as a 0-d float tensor (no host synchronisation).

    One ``torch._foreach_norm`` per device/dtype: 2-norms through :func:`gradkit._kernels.sq_norms`, other orders
    with ``torch._foreach_norm(grads, norm_type)`` and a norm of the per-tensor norms, as torch does.
    """
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    if norm_type == 2.0:
        return torch.stack([s.to(device) for s in sq_norms(grads)]).sum().sqrt()
    norms: list[torch.Tensor] = []
    for group in group_by_device_dtype([list(grads)]):
        norms.extend(n.to(device) for n in torch._foreach_norm(group[0], norm_type))
    stacked = torch.stack(norms)
    if math.isinf(norm_type):
        return stacked.max()
    return torch.linalg.vector_norm(stacked, norm_type)


def scale_(grads: Sequence[torch.Tensor], coef: torch.Tensor | float) -> None:
    """``g *= coef`` for every gradient, one foreach call per device/dtype."""
    if not grads:
        return
    for group in group_by_device_dtype([list(grads)]):
        c = coef.to(group[0][0].device) if isinstance(coef, torch.Tensor) else coef
        torch._foreach_mul_(group[0], c)


def has_graph(grads: Sequence[torch.Tensor]) -> bool:
    """True when a gradient carries an autograd graph (``backward(create_graph=True)``, e.g. for AdaHessian).

    Such a gradient must not be edited in place: autograd saved it for the Hessian-vector product that
    differentiates through it. Transforms then compute their statistics on detached values (their factors are
    constants of the graph) and replace ``.grad`` with a new tensor that extends the graph.
    """
    return any(g.requires_grad for g in grads)


def replace_grads(params: Sequence[torch.Tensor], new_grads: Sequence[torch.Tensor]) -> None:
    """``p.grad = new`` for each pair (the out-of-place path for graph-carrying gradients)."""
    for p, g in zip(params, new_grads):
        p.grad = g


def scale_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], coef: torch.Tensor | float) -> None:
    """``g *= coef`` in place, or, for graph-carrying gradients, ``p.grad = g * coef`` out of place."""
    if not has_graph(grads):
        scale_(grads, coef)
        return
    with torch.enable_grad():
        replace_grads(params, [g * (coef.to(g.device) if isinstance(coef, torch.Tensor) else coef) for g in grads])


def measure(params: Iterable[torch.Tensor], norm_type: float = 2.0
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None:
    """(parameters with a gradient, their gradients, the global norm as a 0-d tensor), or None without gradients.

    The norm is taken without recording a graph, so it is a constant even for graph-carrying gradients.
    """
    ps = [p for p in params if p.grad is not None]
    if not ps:
        return None
    grads = [p.grad for p in ps]
    with torch.no_grad():
        return ps, grads, global_norm(grads, norm_type)
