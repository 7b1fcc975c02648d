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
from .errors import NonFiniteError

__all__ = ["Comm", "DistributedError", "is_distributed", "resolve_comm"]


class DistributedError(RuntimeError):
    """A rank failed (or stopped answering) during a gradkit collective; raised on every rank.

    Its message names the failing rank(s) and their error.
    """


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and its default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def resolve_comm(comm: Comm | str | None, seed: int | None = None) -> Comm | None:
    """A source's ``comm=`` argument: ``"auto"`` means a :class:`Comm` when torch.distributed is initialised.

    With a seed, checks that every rank holds the same one (shared perturbations need a shared seed).

    Args:
        comm: ``"auto"`` (a :class:`Comm` when ``torch.distributed`` is initialised, else None), None (every rank
            independent), or a :class:`Comm`.
        seed: the source's seed, checked equal on every rank; None skips the check.

    Returns:
        The :class:`Comm` to use, or None outside ``torch.distributed`` (or for a single-rank group).
    """
    if comm == "auto":
        comm = Comm() if is_distributed() else None
    elif comm is not None and not isinstance(comm, Comm):
        raise ValueError(f"comm must be 'auto', None or a gradkit.distributed.Comm, got {comm!r}")
    if comm is not None and seed is not None:
        comm.check_same(seed, "seed")
    return comm if comm is not None and comm.active else None


class Comm:
    """gradkit's collectives over a process group, with a byte counter and failure propagation.

    Construct it on every rank (it creates a gloo group with ``timeout`` — a collective call).

    Args:
        timeout: seconds after which a collective that a peer does not join raises on every rank (default 60).
        ranks: the ranks of the group (default None: every rank of the default group).
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

    def gather_scalars(self, compute: Callable[[], torch.Tensor], n: int, per_item: int = 1) -> torch.Tensor:
        """All ``n`` items' scalars, ``[n, per_item]`` float64 (``[n]`` when ``per_item == 1``), in item order.

        ``compute()`` returns this rank's items, ``split(n)``, as ``len(split(n))·per_item`` values.
        """
        mine = self.split(n)
        err: BaseException | None = None
        try:
            local = torch.as_tensor(compute(), dtype=torch.float64).reshape(-1).cpu()
            if local.numel() != len(mine) * per_item:
                raise ValueError(f"compute() returned {local.numel()} values, this rank owns "
                                 f"{len(mine)} items of {per_item}")
        except Exception as exc:  # reported to every rank below, then re-raised here
            err, local = exc, torch.zeros(len(mine) * per_item, dtype=torch.float64)
        code = 0.0 if err is None else 2.0 if isinstance(err, NonFiniteError) else 1.0
        if not self.active:
            if err is not None:
                raise err
            return local.reshape(n, per_item) if per_item > 1 else local
        width = -(-n // self.world) * per_item  # every rank sends the same size
        packet = torch.zeros(width + 1, dtype=torch.float64)
        packet[0] = code
        packet[1:1 + local.numel()] = local
        table = self._all_gather(packet)
        failed = [r for r in range(self.world) if table[r, 0] != 0]
        if failed:
            messages: list[Any] = [None] * self.world
            # Only on the failure path: every rank knows it failed, so every rank joins this exchange.
            dist.all_gather_object(messages, None if err is None else f"{type(err).__name__}: {err}",
                                   group=self._group)
            detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
            if all(table[r, 0] == 2.0 for r in failed):
                # Keep the type: a Pipeline with on_nonfinite="skip" skips the step on every rank alike.
                raise NonFiniteError(f"non-finite loss on rank(s) {failed} ({detail}); nothing was updated") from err
            raise DistributedError(f"closure failed on rank(s) {failed} ({detail})") from err
        out = torch.cat([table[r, 1:1 + len(self._split_of(r, n)) * per_item] for r in range(self.world)])
        return out.reshape(n, per_item) if per_item > 1 else out

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
