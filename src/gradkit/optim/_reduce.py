"""Global reductions inside update rules, for optimizers whose step needs sums over all parameters.

DoG, D-Adaptation and Prodigy set their step size from quantities summed over every parameter (distances,
inner products, norms). Their update rules are ordinary :class:`~gradkit._kernels.Elementwise` rules that,
besides updating tensors in place, write per-tensor partial sums into 0-d output tensors with
:func:`put_sum` (one output per tensor, allocated by :func:`partials`). The caller then adds the partials of
all tensors on the host with :func:`totals`: one synchronisation per step, whatever the number of tensors.

Under ``"compiled"`` the sums are computed in the same loop as the elementwise work that feeds them, so a sum
of a value the rule has just computed (a new state buffer, say) costs no extra pass over memory. Inductor does
not fuse a sum over the *old* value of a buffer with the loop that overwrites it; rules that need such a sum
run it as a separate, read-only rule first. Under ``"foreach"`` sums of squares and absolute values use one
``torch._foreach_norm`` call; other sums are per tensor. Partial sums are accumulated in float32 (float64 for
float64 parameters) and added across tensors in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._kernels import TensorList

__all__ = ["live_groups", "partials", "per_tensor", "put_abs_sum", "put_sq_sum", "put_sum", "shared_lr", "totals"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def partials(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One 0-d accumulator per parameter, on its device."""
    return [torch.zeros((), dtype=_acc_dtype(p.dtype), device=p.device) for p in params]


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def put_sum(out, x) -> None:
    """``out ← Σ x`` per tensor (``out`` and ``x`` both tensors, or both :class:`TensorList`)."""
    if isinstance(x, TensorList):
        for o, t in zip(out.ts, x.ts):
            o.copy_(_wide(t).sum())
    else:
        out.copy_(_wide(x).sum())


def _put_norm(out, x, ord_: float) -> None:
    norms = torch._foreach_norm([_wide(t) for t in x.ts], ord_)
    if ord_ == 2:
        torch._foreach_mul_(norms, norms)
    torch._foreach_copy_(out.ts, norms)


def put_sq_sum(out, x) -> None:
    """``out ← Σ x²`` per tensor."""
    if isinstance(x, TensorList):
        _put_norm(out, x, 2)
    else:
        out.copy_(_wide(x).square().sum())


def put_abs_sum(out, x) -> None:
    """``out ← Σ |x|`` per tensor."""
    if isinstance(x, TensorList):
        _put_norm(out, x, 1)
    else:
        out.copy_(_wide(x).abs().sum())


def totals(*lists: Sequence[torch.Tensor]) -> list[float]:
    """The float64 sum of each list of partials, read back with a single device synchronisation."""
    flat = [t for lst in lists for t in lst]
    if not flat:
        return [0.0] * len(lists)
    dev = flat[0].device
    stacked = torch.stack([t.to(dev, torch.float64) for t in flat])
    sums = []
    start = 0
    for lst in lists:
        sums.append(stacked[start:start + len(lst)].sum())
        start += len(lst)
    return [float(v) for v in torch.stack(sums).tolist()]


def per_tensor(lst: Sequence[torch.Tensor]) -> list[float]:
    """The partials of one list as Python floats (one synchronisation)."""
    if not lst:
        return []
    dev = lst[0].device
    return torch.stack([t.to(dev, torch.float64) for t in lst]).tolist()


def live_groups(param_groups: Sequence[dict], active: Sequence[tuple[dict, list]]) -> tuple[float, list]:
    """(the shared lr, the ``(group, params)`` pairs that step now: lr > 0 and some gradients)."""
    return shared_lr(param_groups), [(g, ps) for g, ps in active if g["lr"] > 0 and ps]


def shared_lr(param_groups: Sequence[dict]) -> float:
    """The learning rate shared by all groups of a D-Adaptation-style optimizer (whose d is global).

    As in the reference packages, every group must use the same lr, or 0 (which freezes the group).
    """
    lr = max(g["lr"] for g in param_groups)
    for i, g in enumerate(param_groups):
        if g["lr"] not in (lr, 0.0):
            raise ValueError(f"lr must be the same in every param group (or 0 to freeze one): group {i} has "
                             f"lr={g['lr']!r}, another {lr!r}. The step size d is estimated for all groups together.")
    return lr
