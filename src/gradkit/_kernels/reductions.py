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

    Two fast fused passes per device and dtype, the max and the 2-norm of each tensor: a NaN or +Inf makes the max
    non-finite, a −Inf makes the 2-norm infinite. (The foreach max-norm, which would settle everything in one pass,
    is not fused on CPU: 479 ms over 10M float32 elements in 40 tensors against 1 + 2 ms for these two.) A sum of
    squares can overflow on finite data (elements above ~1e19 in float32), so when only the 2-norm is non-finite
    the answer is settled with the max-norm: a second pass and synchronisation, only for a −Inf or huge values.
    Each device and dtype reduces its own tensors to two flags on the device; the flags of all devices are
    gathered on one device and read back once. Half precision is reduced in float32.

    Args:
        tensors: The tensors (``None`` entries are not allowed).
    """
    ts = [t.detach() for t in tensors if t.numel()]
    if not ts:
        return True
    groups = group_by_device_dtype([ts])
    flags = []
    for g in groups:
        maxes = torch.stack(torch._foreach_max(g[0]))
        norms = torch.stack(torch._foreach_norm(g[0], 2, dtype=torch.float32 if g[0][0].element_size() < 4 else None))
        flags.append(torch.stack([torch.isfinite(maxes).all(), torch.isfinite(norms).all()]))
    ok = _to_one_device(flags).all(0)
    code = int(ok[0].long() + 2 * ok[1].long())  # the one read: bit 0 = every max finite, bit 1 = every 2-norm
    if not code & 1:
        return False
    if code & 2:
        return True
    return all(bool(torch.isfinite(m)) for g in groups for m in torch._foreach_norm(g[0], float("inf")))
