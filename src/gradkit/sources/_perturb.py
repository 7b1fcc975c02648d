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
saved sparsely as (chunk-local int32 index, value). Undoing the shift computes the same ``fl(p' − d)`` and writes those
elements back. So restoration is exact by construction, for any values (NaN included). The saved data is
the elements whose magnitude is below about ``|d|`` or that cross a binade — measured at 1–10 % of the
elements of a freshly initialised MLP with ``ε = 1e-3``, at 8 bytes each, i.e. up to ~20 % of the parameter
memory while the parameters are shifted; every shift is undone before the next one, so errors never
compound. ``exact=False`` (the sources' ``exact_restore=False``) drops this bookkeeping, as MeZO does.
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
    both have ``E[z zᵀ] = I``. ``exact=False`` skips the bookkeeping of bit-exact restoration (``p + d − d``
    may then differ from ``p`` in the last bit of a few elements, as in MeZO). Directions are generated in
    each parameter's dtype and on its device, in flat chunks of ``chunk`` elements drawn one after another
    from the parameter's generator, so shifting or updating a parameter needs temporaries of one chunk, not
    of the whole parameter (a 4096×4096 matrix is shifted with ~3 MiB of scratch instead of ~150 MiB).
    """

    def __init__(self, params: Sequence[torch.Tensor], seed: int, distribution: str = "gaussian",
                 chunk: int = 1 << 18, exact: bool = True):
        self.params = list(params)
        self.exact = bool(exact)
        self.seed = int(seed)
        self.distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
        self.chunk = int(chunk)
        self._gens: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._gens.get(device)
        if gen is None:
            gen = self._gens[device] = torch.Generator(device=device)
        return gen

    def _chunks(self, i: int, step: int, k: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, z[start:stop])`` over the flattened direction ``k`` of parameter ``i``."""
        p = self.params[i]
        gen = self._generator(p.device)
        gen.manual_seed(stream_seed(self.seed, step, k, i))
        n = p.numel()
        for a in range(0, n, self.chunk):
            b = min(n, a + self.chunk)
            if self.distribution == "gaussian":
                z = torch.randn(b - a, generator=gen, dtype=p.dtype, device=p.device)
            else:
                bits = torch.randint(0, 2, (b - a,), generator=gen, dtype=torch.int8, device=p.device)
                z = bits.to(p.dtype).mul_(2).sub_(1)
            yield a, b, z

    def direction(self, i: int, step: int, k: int) -> torch.Tensor:
        """Direction ``k`` of step ``step`` for parameter ``i`` (a fresh tensor, same on every call)."""
        p = self.params[i]
        out = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
        for a, b, z in self._chunks(i, step, k):
            out[a:b] = z
        return out.view(p.shape)

    def _active(self) -> list[int]:
        # A controller may freeze parameters after construction: frozen ones are neither shifted nor updated.
        return [i for i, p in enumerate(self.params) if p.requires_grad]

    @staticmethod
    def _flat(p: torch.Tensor) -> torch.Tensor | None:
        """A flat view sharing ``p``'s storage, or None for a non-contiguous parameter."""
        return p.view(-1) if p.is_contiguous() else None

    # -- evaluate --------------------------------------------------------------------------------------
    def _shift_one(self, i: int, step: int, k: int, alpha: float, undo: list) -> None:
        p = self.params[i]
        flat = self._flat(p)
        if flat is None:  # rare: work on the whole tensor, temporaries of its size
            d = self.direction(i, step, k).mul_(alpha)
            moved = torch.add(p, d)
            lossy = torch.ne(torch.sub(moved, d, out=d), p)
            idx = lossy.nonzero(as_tuple=True) if bool(lossy.any()) else None
            undo.append((i, idx, p[idx] if idx is not None else None))
            p.copy_(moved)
            return
        saved_idx, saved_val = [], []
        for a, b, z in self._chunks(i, step, k):
            d = z.mul_(alpha)
            seg = flat[a:b]
            if not self.exact:
                seg.add_(d)
                undo.append((i, (a, b), None))
                continue
            moved = torch.add(seg, d)
            lossy = torch.ne(torch.sub(moved, d, out=d), seg)  # d now holds fl(fl(p + d) - d)
            if bool(lossy.any()):
                idx = lossy.nonzero().squeeze(1)
                saved_val.append(seg[idx])
                # Chunk-local int32 indices: 8 bytes per saved element instead of 12.
                saved_idx.append(idx.to(torch.int32))
            seg.copy_(moved)
            # Recorded chunk by chunk: an interruption mid-parameter still restores what was shifted.
            undo.append((i, (a, b), (saved_idx.pop(), saved_val.pop()) if saved_idx else None))

    def _unshift_one(self, i: int, step: int, k: int, alpha: float, entries: list) -> None:
        p = self.params[i]
        flat = self._flat(p)
        if flat is None:
            (_, idx, vals), = entries
            p.sub_(self.direction(i, step, k).mul_(alpha))
            if idx is not None:
                p[idx] = vals
            return
        done = {span[0]: saved for _, span, saved in entries}
        for a, b, z in self._chunks(i, step, k):
            if a not in done:
                break
            seg = flat[a:b]
            seg.sub_(z.mul_(alpha))
            if done[a] is not None:
                idx, vals = done[a]
                seg[idx.long()] = vals

    @contextlib.contextmanager
    def shifted(self, step: int, k: int, alpha: float) -> Iterator[None]:
        """Parameters are ``p + alpha·z_k`` inside the block and exactly ``p`` again after it, even on error."""
        undo: list = []
        try:
            with torch.no_grad():
                for i in self._active():
                    self._shift_one(i, step, k, alpha, undo)
            yield
        finally:
            with torch.no_grad():
                by_param: dict[int, list] = {}
                for entry in undo:
                    by_param.setdefault(entry[0], []).append(entry)
                for i, entries in by_param.items():
                    self._unshift_one(i, step, k, alpha, entries)

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
                p = self.params[i]
                acc = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                for k, w in zip(ks, weights):
                    for a, b, z in self._chunks(i, step, k):
                        acc[a:b].add_(z, alpha=float(w))
                p.grad = acc.view(p.shape)

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
                flat = self._flat(p)
                for k, w in zip(ks, weights):
                    if flat is None:
                        p.add_(self.direction(i, step, k), alpha=scale * float(w))
                        continue
                    for a, b, z in self._chunks(i, step, k):
                        flat[a:b].add_(z, alpha=scale * float(w))
