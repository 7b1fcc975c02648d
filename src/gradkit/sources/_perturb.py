"""Seeded perturbations of parameters: regenerated from seeds, applied in place, undone bit-exactly.

The one place zeroth-order and evolution-strategy sources (SPSA, ZOSGD, ES) get their random directions.
Direction ``k`` of step ``t`` for parameter ``i`` is drawn from a private ``torch.Generator`` seeded with a hash
of ``(seed, t, k, i)``, so it can be regenerated anywhere — on another rank, or after an exception — and is
never stored. A step is split into two separable halves, which is what distributed training needs (every rank
regenerates every direction from the shared seed; only scalars travel):

* :meth:`Perturbation.shifted` / :meth:`Perturbation.evaluate` — the closure at ``p + a·z_k`` for chosen
  directions ``k`` and offsets ``a``: a list of loss *scalars*;
* :meth:`Perturbation.combine` (into ``.grad``) and :meth:`Perturbation.apply` (straight into the parameters)
  — ``Σ_k w_k z_k`` regenerated from the seeds, one parameter and one direction at a time.

Bit-exact restoration. In floating point ``(p + d) - d`` is not always ``p``: information is lost when
``p + d`` rounds (ties, crossing into a coarser binade, ``|d| ≫ |p|``), and a chain ``+εz, −2εz, +εz`` loses
more. Storing a copy of the parameters would double parameter memory, which is exactly what the fused
zeroth-order mode must avoid. Instead, when a parameter is shifted, the round trip ``fl(fl(p + d) − d)`` is
computed once (a temporary of one parameter's size) and the few elements where it differs from ``p`` are
saved sparsely as (index, value). Undoing the shift computes the same ``fl(p' − d)`` and writes those elements
back. So restoration is exact by construction, for any values (NaN included), while the saved data is
typically a handful of elements; every shift is undone before the next one, so errors never compound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from .._validate import check_choice
from .base import check_loss

__all__ = ["DISTRIBUTIONS", "Perturbation", "centred_ranks", "stream_seed"]

DISTRIBUTIONS = ("gaussian", "rademacher")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(*keys: int) -> int:
    """A 63-bit generator seed from integer keys; nearby keys give unrelated streams (SplitMix64 chaining)."""
    h = 0x5DEECE66D
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h & ((1 << 63) - 1)


def centred_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks of ``values`` mapped linearly onto [-0.5, 0.5] (ties broken by position), as in OpenAI-ES."""
    n = values.numel()
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[torch.argsort(values.reshape(-1), stable=True)] = torch.arange(n, dtype=torch.float64)
    return ranks / max(n - 1, 1) - 0.5


class Perturbation:
    """Seeded directions over a fixed list of parameters.

    ``distribution``: ``"gaussian"`` (``z ~ N(0, I)``) or ``"rademacher"`` (``±1`` with equal probability);
    both have ``E[z zᵀ] = I``. Directions are generated in each parameter's dtype and on its device.
    """

    def __init__(self, params: Sequence[torch.Tensor], seed: int, distribution: str = "gaussian"):
        self.params = list(params)
        self.seed = int(seed)
        self.distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
        self._gens: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._gens.get(device)
        if gen is None:
            gen = self._gens[device] = torch.Generator(device=device)
        return gen

    def direction(self, i: int, step: int, k: int) -> torch.Tensor:
        """Direction ``k`` of step ``step`` for parameter ``i`` (a fresh tensor, same on every call)."""
        p = self.params[i]
        gen = self._generator(p.device)
        gen.manual_seed(stream_seed(self.seed, step, k, i))
        if self.distribution == "gaussian":
            return torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)
        bits = torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8, device=p.device)
        return bits.to(p.dtype).mul_(2).sub_(1)

    def _active(self) -> list[int]:
        # A controller may freeze parameters after construction: frozen ones are neither shifted nor updated.
        return [i for i, p in enumerate(self.params) if p.requires_grad]

    # -- evaluate --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def shifted(self, step: int, k: int, alpha: float) -> Iterator[None]:
        """Parameters are ``p + alpha·z_k`` inside the block and exactly ``p`` again after it, even on error."""
        undo: list[tuple[int, tuple[torch.Tensor, ...] | None, torch.Tensor | None]] = []
        try:
            with torch.no_grad():
                for i in self._active():
                    p = self.params[i]
                    d = self.direction(i, step, k).mul_(alpha)
                    moved = torch.add(p, d)
                    lossy = torch.sub(moved, d) != p
                    if bool(lossy.any()):
                        idx = lossy.nonzero(as_tuple=True)
                        undo.append((i, idx, p[idx].clone()))
                    else:
                        undo.append((i, None, None))
                    del d, lossy
                    p.copy_(moved)
                    del moved
            yield
        finally:
            with torch.no_grad():
                for i, idx, vals in undo:
                    p = self.params[i]
                    p.sub_(self.direction(i, step, k).mul_(alpha))
                    if idx is not None:
                        p[idx] = vals

    def evaluate(self, closure: Callable[[], torch.Tensor], step: int, shifts: Sequence[tuple[int, float]],
                 *, where: str = "closure") -> torch.Tensor:
        """Loss at ``p + a·z_k`` for each ``(k, a)`` in ``shifts``, under ``torch.no_grad`` (float64 scalars).

        A non-finite loss raises :class:`~gradkit.NonFiniteError` (parameters restored first); a loss that is
        not a real scalar raises ``ValueError``.
        """
        out = torch.empty(len(shifts), dtype=torch.float64)
        for j, (k, a) in enumerate(shifts):
            with self.shifted(step, k, a), torch.no_grad():
                out[j] = float(check_loss(closure(), where=where))
        return out

    # -- combine ---------------------------------------------------------------------------------------
    def combine(self, step: int, ks: Sequence[int], weights: Sequence[float]) -> None:
        """Overwrite ``.grad`` with ``Σ_j weights[j]·z_{ks[j]}`` (one parameter-sized buffer per parameter)."""
        with torch.no_grad():
            for i in self._active():
                acc = None
                for k, w in zip(ks, weights):
                    z = self.direction(i, step, k)
                    acc = z.mul_(float(w)) if acc is None else acc.add_(z, alpha=float(w))
                self.params[i].grad = acc

    def apply(self, step: int, ks: Sequence[int], weights: Sequence[float], scale: float,
              only: Sequence[int] | None = None) -> None:
        """``p += scale·Σ_j weights[j]·z_{ks[j]}`` in place, with no gradient buffer (the fused update).

        ``only``: indices of the parameters to update (default: all trainable ones).
        """
        keep = None if only is None else set(only)
        with torch.no_grad():
            for i in self._active():
                if keep is not None and i not in keep:
                    continue
                p = self.params[i]
                for k, w in zip(ks, weights):
                    p.add_(self.direction(i, step, k), alpha=scale * float(w))
