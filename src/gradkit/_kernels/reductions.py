"""Reductions shared by optimizers, transforms and the pipeline: one host synchronisation, however many tensors.

Each function launches per-device work without reading anything back, then reads its answer with a single
synchronisation (none for :func:`sq_norms`, which returns device tensors).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from .tensorlist import group_by_device_dtype

__all__ = ["all_finite", "sq_norm_total", "sq_norms"]


def sq_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Squared L2 norm of each tensor (float32 or wider) as 0-d tensors on its device; no synchronisation.

    One ``torch._foreach_norm`` call per device and dtype.

    Args:
        tensors: The tensors.
    """
    if not tensors:
        return []
    out: list[torch.Tensor | None] = [None] * len(tensors)
    index: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        index[(t.device, t.dtype)].append(i)
    for idx in index.values():
        norms = torch._foreach_norm([tensors[i] for i in idx], 2)
        for i, n in zip(idx, norms):
            out[i] = n.float().square() if n.dtype in (torch.float16, torch.bfloat16) else n.square()
    return out  # type: ignore[return-value]


def _to_one_device(values: list[torch.Tensor]) -> torch.Tensor:
    """Stack 0-d tensors living on several devices onto the first one's device (copies queue; nothing waits)."""
    dev = values[0].device
    return torch.stack([v if v.device == dev else v.to(dev, non_blocking=True) for v in values])


def sq_norm_total(tensors: Sequence[torch.Tensor]) -> float:
    """Σ over all tensors of Σ x², accumulated in float64 (float32 on devices without it), one synchronisation.

    Args:
        tensors: The tensors.
    """
    if not tensors:
        return 0.0
    per_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for n in sq_norms(tensors):
        per_device[n.device].append(n)
    acc = torch.float32 if any(d.type == "mps" for d in per_device) else torch.float64
    sums = [torch.stack([n.to(acc) for n in ns]).sum() for ns in per_device.values()]
    return float(_to_one_device(sums).sum())


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every element of every tensor is finite. One synchronisation, however many tensors and devices.

    Uses the max-norm per tensor: it propagates NaN and Inf and, unlike a sum, cannot overflow on finite data.
    Each device and dtype reduces its own tensors to one flag on the device; the flags of all devices are
    gathered on one device and read back once.

    Args:
        tensors: The tensors (``None`` entries are not allowed).
    """
    if not tensors:
        return True
    flags = []
    for group in group_by_device_dtype([[t.detach() for t in tensors]]):
        maxes = torch._foreach_norm(group[0], float("inf"))
        flags.append(torch.isfinite(torch.stack(maxes)).all())
    return bool(_to_one_device(flags).all())
