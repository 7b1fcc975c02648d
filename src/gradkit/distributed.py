"""torch.distributed for perturbation methods: shared seeds, scalar all-gathers, failures that never hang.

Zeroth-order, ES and search methods have a property backprop lacks: when every rank can regenerate every
perturbation from a shared seed, ranks only need to exchange *the scalars* (one loss or fitness per direction
or candidate). :class:`Comm` is the single place gradkit talks to ``torch.distributed``:

* ``split(n)`` — this rank's contiguous share of ``n`` directions/candidates;
* ``gather_scalars(compute, n)`` — runs ``compute()`` (this rank's scalars), all-gathers every rank's
  scalars and returns all ``n`` in order. If ``compute`` raised on any rank, *every* rank raises a
  ``RuntimeError`` naming the failing rank(s) and their error; if a rank does not answer within ``timeout``
  seconds, the others raise instead of hanging;
* ``check_same(value, name)`` — refuses to run when ranks disagree on a seed;
* ``bytes_sent`` — payload bytes this rank sent through these collectives (for an all-gather of ``b`` bytes
  per rank: ``b·(world−1)``), the "bytes on the wire" statistic.

Outside ``torch.distributed`` (not initialised) a ``Comm`` is a single-process no-op with the same API, so
code written against it runs unchanged in one process.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ._validate import check_positive

__all__ = ["Comm", "DistributedError", "is_distributed"]


class DistributedError(RuntimeError):
    """A rank failed (or stopped answering) during a gradkit collective; raised on every rank."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class Comm:
    """gradkit's collectives over a process group, with a byte counter and failure propagation.

    Construct it on every rank (it creates a gloo group with ``timeout`` — a collective call). ``group=None``
    uses all ranks of the default group.
    """

    def __init__(self, timeout: float = 60.0, ranks: list[int] | None = None):
        self.timeout = check_positive("timeout", timeout)
        self.bytes_sent = 0
        self.calls = 0
        self._group = None
        if is_distributed():
            # A group of our own: its timeout bounds every gradkit collective, whatever the default group's
            # (30 minutes by default), and gloo carries CPU scalars even when the model trains with NCCL.
            self._group = dist.new_group(ranks=ranks, backend="gloo",
                                         timeout=datetime.timedelta(seconds=self.timeout))
            self.rank = dist.get_rank(self._group)
            self.world = dist.get_world_size(self._group)
        else:
            self.rank, self.world = 0, 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def split(self, n: int) -> range:
        """This rank's contiguous share of ``range(n)`` (sizes differ by at most one, lower ranks first)."""
        return self._split_of(self.rank, n)

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1).contiguous()
        out = torch.empty(self.world * flat.numel(), dtype=t.dtype)
        try:
            dist.all_gather_into_tensor(out, flat, group=self._group)
        except Exception as exc:
            raise DistributedError(
                f"rank {self.rank}: a gradkit collective failed or timed out after {self.timeout:g} s "
                f"(a peer crashed or stopped answering): {exc}".splitlines()[0]
            ) from exc
        self.calls += 1
        self.bytes_sent += t.numel() * t.element_size() * (self.world - 1)
        return out.view(self.world, *t.shape)

    def gather_scalars(self, compute: Callable[[], torch.Tensor], n: int) -> torch.Tensor:
        """All ``n`` scalars, this rank computing ``compute()`` = its ``len(split(n))`` values (float64)."""
        mine = self.split(n)
        err: BaseException | None = None
        try:
            local = torch.as_tensor(compute(), dtype=torch.float64).reshape(-1).cpu()
            if local.numel() != len(mine):
                raise ValueError(f"compute() returned {local.numel()} values, this rank owns {len(mine)}")
        except Exception as exc:  # reported to every rank below, then re-raised here
            err, local = exc, torch.zeros(len(mine), dtype=torch.float64)
        if not self.active:
            if err is not None:
                raise err
            return local
        width = -(-n // self.world)  # ceil: every rank sends the same size
        packet = torch.zeros(width + 1, dtype=torch.float64)
        packet[0] = 0.0 if err is None else 1.0
        packet[1:1 + len(mine)] = local
        table = self._all_gather(packet)
        failed = [r for r in range(self.world) if table[r, 0] != 0]
        if failed:
            messages: list[Any] = [None] * self.world
            # Only on the failure path: every rank knows it failed, so every rank joins this exchange.
            dist.all_gather_object(messages, None if err is None else f"{type(err).__name__}: {err}",
                                   group=self._group)
            detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
            raise DistributedError(f"closure failed on rank(s) {failed} ({detail})") from err
        parts = [table[r, 1:1 + len(self._split_of(r, n))] for r in range(self.world)]
        return torch.cat(parts)

    def _split_of(self, rank: int, n: int) -> range:
        base, extra = divmod(n, self.world)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (1 if rank < extra else 0))

    def check_same(self, value: int | float, name: str) -> None:
        """Raise ``ValueError`` on every rank when ranks hold different ``value`` (e.g. a seed)."""
        if not self.active:
            return
        got = self._all_gather(torch.tensor([float(value)], dtype=torch.float64)).reshape(-1)
        if not bool((got == got[0]).all()):
            raise ValueError(f"{name} must be equal on every rank (shared perturbations), got {got.tolist()}")

    def stats(self) -> dict[str, int]:
        return {"bytes_sent": self.bytes_sent, "collectives": self.calls, "world": self.world}
