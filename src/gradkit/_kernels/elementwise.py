"""An elementwise multi-tensor update rule, written once and run as ``loop``, ``foreach``, ``compiled`` or ``auto``."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from . import compiling as _compile
from .tensorlist import TensorList, group_by_device_dtype

__all__ = ["Elementwise"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


class Elementwise:
    """One elementwise multi-tensor update rule, runnable as ``loop``, ``foreach``, ``compiled`` or ``auto``.

    ``fn(*tensors, **scalars)`` receives one tensor per list (or one :class:`TensorList` per list) and must
    write its results in place. Scalars are Python floats, or 0-d tensors on the compiled path. The rule must be
    shape-agnostic: elementwise operations between tensors of one row (same shape), full reductions into 0-d
    outputs, no dimension-specific operation; the compiled path runs it on the rows flattened to 1-D.

    Args:
        fn: The rule, in-place tensor arithmetic on one row.
        name: Its name in logs and compile events; default ``fn.__name__``.
    """

    def __init__(self, fn: Callable[..., None], name: str | None = None):
        self.fn = fn
        self.name = name or fn.__name__
        self._graphs: _compile.CompiledRule | None = None
        self._variants: dict[tuple, Elementwise] = {}

    def variant(self, **static: Any) -> Elementwise:
        """The rule with some keyword arguments fixed at trace time (flags such as ``amsgrad=True``).

        Static arguments select code paths; they are Python values, never turned into tensors, and each
        combination is its own kernel (its own compiled graph).

        Args:
            **static: Keyword arguments of the rule to fix.
        """
        key = tuple(sorted(static.items()))
        if not key:
            return self
        if key not in self._variants:
            suffix = "_".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in key)
            self._variants[key] = Elementwise(functools.partial(self.fn, **static), f"{self.name}_{suffix}")
        return self._variants[key]

    def __repr__(self) -> str:
        return f"Elementwise({self.name})"

    @property
    def graphs(self) -> _compile.CompiledRule:
        """The rule's compiled graphs (created on first use; creating them compiles nothing)."""
        if self._graphs is None:
            self._graphs = _compile.CompiledRule(self.fn, self.name)
        return self._graphs

    def __call__(self, mode: str, lists: Sequence[Sequence[torch.Tensor]], scalars: Mapping[str, float]) -> None:
        """Apply the rule to every row of ``lists``.

        Args:
            mode: ``"loop"``, ``"foreach"``, ``"compiled"`` or ``"auto"`` (see :mod:`gradkit._kernels`).
            lists: Parallel lists of tensors, one list per argument of the rule.
            scalars: The rule's keyword scalars.
        """
        if not lists or not lists[0]:
            return
        if mode == "loop":
            for tensors in zip(*lists):
                self.fn(*tensors, **scalars)
        elif mode == "foreach":
            self._foreach(lists, scalars)
        elif mode in ("compiled", "auto"):
            self._compiled_or_auto(mode == "auto", lists, scalars)
        else:
            raise ValueError(f"kernel must be one of {_compile.KERNELS}, got {mode!r}")

    def _foreach(self, lists: Sequence[Sequence[torch.Tensor]], scalars: Mapping[str, float]) -> None:
        for group in group_by_device_dtype(lists):
            for chunk in _cache_blocks(group):
                self.fn(*(TensorList(lst) for lst in chunk), **scalars)

    def _compiled_or_auto(self, auto: bool, lists: Sequence[Sequence[torch.Tensor]],
                          scalars: Mapping[str, float]) -> None:
        if auto and _compile.auto_unavailable() is not None:
            self._foreach(lists, scalars)
            return
        graphs = self.graphs
        grad = torch.is_grad_enabled()
        names = tuple(sorted(scalars))
        for group in group_by_device_dtype(lists):
            ref = group[0][0]
            sdtype = ref.dtype if ref.is_floating_point() else torch.float32
            ledger = (ref.device, tuple(lst[0].dtype for lst in group), names, grad)
            if auto and ledger not in graphs.activated:
                # Not (yet) worth a compile: eager, and count what it cost (the ski-rental ledger).
                # CPU time of the stepping thread, not wall time: a machine busy with other work (or worker threads
                # spinning) must not make a short job look long. On a quiet machine it is about the wall time.
                limit = _compile.compile_after()
                start = time.thread_time()
                self._foreach(group, scalars)
                spent = graphs.eager_seconds.get(ledger, 0.0) + time.thread_time() - start
                graphs.eager_seconds[ledger] = spent
                if spent >= limit and not math.isinf(limit):
                    graphs.activated.add(ledger)
                    for sig in _plan(group, ref.device, names, sdtype, grad)[0]:
                        graphs.compile_in_background(sig)
                continue
            plan, eager_rows = _plan(group, ref.device, names, sdtype, grad)
            ts = {k: torch.tensor(v, dtype=sdtype) for k, v in scalars.items()}
            for sig, (rows, index) in plan.items():
                if sig not in graphs.ready:
                    if auto:
                        graphs.compile_in_background(sig)
                        eager_rows.extend(index)
                        continue
                    graphs.compile(sig, background=False)
                left = graphs.run(sig, rows, ts, may_compile=not auto)
                eager_rows.extend(index[i] for i in left)
            if eager_rows:
                eager_rows.sort()
                self._foreach([[lst[i] for i in eager_rows] for lst in group], scalars)


def _plan(group: list[list[torch.Tensor]], device: torch.device, names: tuple[str, ...], sdtype: torch.dtype,
          grad: bool) -> tuple[dict[tuple, tuple[list[list[torch.Tensor]], list[int]]], list[int]]:
    """Sort the rows of one device/dtype group by compiled-graph signature, each row flattened to 1-D.

    Returns ``({signature: (flat rows, their indices)}, indices of rows for the eager path)``. A row goes eager
    when it cannot be flattened (a non-contiguous tensor, a tensor subclass, tensors of different lengths) or has
    fewer than 2 elements (a graph is general only over lengths ≥ 2).
    """
    plan: dict[tuple, tuple[list[list[torch.Tensor]], list[int]]] = {}
    eager: list[int] = []
    scalar_sig = tuple((k, sdtype) for k in names)
    for i, row in enumerate(zip(*group)):
        n = -1
        flat = []
        for t in row:
            if t.dim() == 0:
                flat.append(t)
                continue
            if type(t) not in _PLAIN or not t.is_contiguous():
                n = -2
                break
            k = t.numel()
            if n == -1:
                n = k
            elif k != n:
                n = -2
                break
            flat.append(t.view(-1))
        if n < 2:
            eager.append(i)
            continue
        sig = (device, _compile.row_signature(flat), scalar_sig, grad)
        entry = plan.get(sig)
        if entry is None:
            entry = plan[sig] = ([], [])
        entry[0].append(flat)
        entry[1].append(i)
    return plan, eager


# On CPU a foreach op is a loop over tensors; what costs is that each out-of-place op materialises a whole
# list of temporaries, which for large lists falls out of cache (and into fresh pages). Blocking the lists so
# one block's temporaries stay cache-sized keeps foreach at least as fast as the per-tensor loop on CPU.
# Accelerators keep one block: there the win of foreach is fewer kernel launches.
CPU_BLOCK_BYTES = 1 << 18


def _cache_blocks(group: list[list[torch.Tensor]]) -> list[list[list[torch.Tensor]]]:
    first = group[0]
    if first[0].device.type != "cpu":
        return [group]
    blocks, start, size = [], 0, 0
    for i, t in enumerate(first):
        nbytes = t.numel() * t.element_size()
        if i > start and size + nbytes > CPU_BLOCK_BYTES:
            blocks.append((start, i))
            start, size = i, 0
        size += nbytes
    blocks.append((start, len(first)))
    if len(blocks) == 1:
        return [group]
    return [[lst[a:b] for lst in group] for a, b in blocks]
