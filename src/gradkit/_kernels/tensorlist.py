"""A list of tensors that does arithmetic with ``torch._foreach_*`` ops.

Optimizer update rules in gradkit are written once, as plain tensor arithmetic on one tensor. Run on a
``TensorList`` the same code issues one multi-tensor (foreach) call per operation instead of one kernel per
tensor; run on a single ``torch.Tensor`` it is the readable per-tensor reference; traced by ``torch.compile``
over a Python list it becomes a fused kernel. ``TensorList`` implements exactly the tensor methods the
update rules use; anything else raises ``AttributeError`` rather than silently looping.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from numbers import Number

import torch

__all__ = ["TensorList", "group_by_device_dtype"]


class TensorList:
    """Tensors of one device and dtype, operated on together by foreach kernels.

    Args:
        tensors: The tensors.
    """

    __slots__ = ("ts",)

    def __init__(self, tensors: Iterable[torch.Tensor]):
        self.ts: list[torch.Tensor] = list(tensors)

    def __len__(self) -> int:
        return len(self.ts)

    def __iter__(self):
        return iter(self.ts)

    def __repr__(self) -> str:
        return f"TensorList(n={len(self.ts)})"

    # -- binary operations -------------------------------------------------------------------------
    @staticmethod
    def _arg(other):
        if isinstance(other, TensorList):
            return other.ts
        if isinstance(other, Number):
            return other
        if isinstance(other, torch.Tensor) and other.dim() == 0:
            return other
        raise TypeError(f"TensorList cannot combine with {type(other).__name__}")

    def __add__(self, other) -> TensorList:
        return TensorList(torch._foreach_add(self.ts, self._arg(other)))

    __radd__ = __add__

    def __sub__(self, other) -> TensorList:
        return TensorList(torch._foreach_sub(self.ts, self._arg(other)))

    def __rsub__(self, other) -> TensorList:
        out = torch._foreach_neg(self.ts)
        torch._foreach_add_(out, self._arg(other))
        return TensorList(out)

    def __mul__(self, other) -> TensorList:
        return TensorList(torch._foreach_mul(self.ts, self._arg(other)))

    __rmul__ = __mul__

    def __truediv__(self, other) -> TensorList:
        return TensorList(torch._foreach_div(self.ts, self._arg(other)))

    def __rtruediv__(self, other) -> TensorList:
        out = torch._foreach_reciprocal(self.ts)
        torch._foreach_mul_(out, self._arg(other))
        return TensorList(out)

    def __neg__(self) -> TensorList:
        return TensorList(torch._foreach_neg(self.ts))

    def maximum(self, other: TensorList) -> TensorList:
        return TensorList(torch._foreach_maximum(self.ts, self._arg(other)))

    def minimum(self, other: TensorList) -> TensorList:
        return TensorList(torch._foreach_minimum(self.ts, self._arg(other)))

    # -- in-place binary operations ----------------------------------------------------------------
    def add_(self, other) -> TensorList:
        torch._foreach_add_(self.ts, self._arg(other))
        return self

    def sub_(self, other) -> TensorList:
        torch._foreach_sub_(self.ts, self._arg(other))
        return self

    def mul_(self, other) -> TensorList:
        torch._foreach_mul_(self.ts, self._arg(other))
        return self

    def div_(self, other) -> TensorList:
        torch._foreach_div_(self.ts, self._arg(other))
        return self

    def lerp_(self, end: TensorList, weight) -> TensorList:
        torch._foreach_lerp_(self.ts, end.ts, self._arg(weight))
        return self

    def copy_(self, other: TensorList) -> TensorList:
        torch._foreach_copy_(self.ts, other.ts)
        return self

    # -- unary operations --------------------------------------------------------------------------
    def __pow__(self, exponent) -> TensorList:
        return TensorList(torch._foreach_pow(self.ts, self._arg(exponent)))

    def sqrt(self) -> TensorList:
        return TensorList(torch._foreach_sqrt(self.ts))

    def sqrt_(self) -> TensorList:
        torch._foreach_sqrt_(self.ts)
        return self

    def abs(self) -> TensorList:
        return TensorList(torch._foreach_abs(self.ts))

    def sign(self) -> TensorList:
        return TensorList(torch._foreach_sign(self.ts))

    def sigmoid(self) -> TensorList:
        return TensorList(torch._foreach_sigmoid(self.ts))

    def square(self) -> TensorList:
        return TensorList(torch._foreach_mul(self.ts, self.ts))

    def clamp(self, min: float | None = None, max: float | None = None) -> TensorList:  # noqa: A002
        out = self.ts
        if min is not None:
            out = torch._foreach_clamp_min(out, min)
        if max is not None:
            out = torch._foreach_clamp_max(out, max)
        return TensorList(out if out is not self.ts else torch._foreach_mul(self.ts, 1.0))

    def clone(self) -> TensorList:
        return TensorList([t.clone() for t in self.ts])


def group_by_device_dtype(lists: Sequence[Sequence[torch.Tensor]]) -> list[list[list[torch.Tensor]]]:
    """Split parallel tensor lists into runs sharing the first list's (device, dtype), order preserved.

    Args:
        lists: Parallel lists of tensors (row i of every list belongs together).
    """
    first = lists[0]
    keys: dict[tuple, list[int]] = {}
    for i, t in enumerate(first):
        keys.setdefault((t.device, t.dtype), []).append(i)
    if len(keys) == 1:
        return [[list(lst) for lst in lists]]
    return [[[lst[i] for i in idx] for lst in lists] for idx in keys.values()]
