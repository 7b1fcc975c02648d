"""The zeroth-order base: losses at seeded perturbations in, ``Σ_k w_k z_k`` out.

Every estimator of this family (SPSA, its fused form ZOSGD, ES) has the same shape: evaluate the closure at
``θ + a·z_k`` for a few seeded directions ``z_k``, turn the losses into one coefficient ``w_k`` per direction,
and form ``ĝ = Σ_k w_k z_k`` by regenerating each ``z_k`` from its seed. Only the middle step — the estimator
formula — differs between methods, so it is the only thing a subclass writes. Everything else is here, once:
the distributed split (each rank evaluates its share of the work, only the losses travel, every rank
regenerates every direction), the non-finite policy, forward-only evaluation (a closure that runs ``backward``
is refused), per-sample (batched) closures, and the state that makes a run resumable.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch

from .._validate import check_int
from ..distributed import Comm, resolve_comm
from ..errors import NonFiniteError
from ._perturb import Perturbation, finite_mean
from .base import Closure, Source

__all__ = ["ZerothOrder"]


class ZerothOrder(Source, metaclass=ABCMeta):
    """Base class of the sources that estimate a gradient from loss values at seeded parameter shifts.

    A subclass states its estimator and nothing else:

    * :attr:`n_items` — the units of work of one step (directions for SPSA, population members for ES): what
      is split across ranks;
    * :attr:`per_item` and :meth:`shifts` — the ``(direction, offset)`` of each of an item's evaluations;
    * :meth:`weights` — the formula: from every item's losses to the directions and their coefficients in
      ``ĝ = Σ_k w_k z_k``.

    Batched (per-sample) closures: when the source's parameters are one tensor with leading dimension ``B``
    (e.g. a batch of sampler states), the closure may return ``B`` losses, one per row. Row ``b``'s estimate then
    uses only ``loss[b]`` and row ``b`` of each direction (rows never mix), ``estimate`` returns the ``B`` mean
    losses, and :meth:`weights` receives losses with a trailing dimension ``B``. Such closures run in one process
    (``comm=None``, or torch.distributed not initialised).

    Args:
        model_or_params: the module or tensors whose gradient is estimated (those with ``requires_grad``).
        seed: seed of the direction streams (shared by every rank); directions are regenerated, never stored.
        distribution: ``"gaussian"`` or ``"rademacher"`` directions ``z``.
        exact_restore: restore the parameters bit-exactly after every evaluation (default True); False drops
            the small restoration record, as MeZO does (last-bit drift of a few elements per step).
        comm: ``"auto"`` (split the work across ranks when torch.distributed is initialised), None, or a
            :class:`gradkit.distributed.Comm`.
        on_nonfinite: what a NaN/Inf loss does — ``"raise"`` (default: :class:`~gradkit.NonFiniteError` at the
            first one, parameters restored, nothing written), ``"skip"`` (the same, but counted in
            ``nonfinite_skips`` instead of raised: no gradient is written — ``.grad`` is set to None — the step
            counter does not move and NaN is returned), ``"ignore"`` (no check: the estimate carries the NaN),
            and for population methods ``"worst"`` (non-finite members rank last / get weight 0).
    """

    #: evaluations per item (SPSA: the two sides of a direction; ES: one member)
    per_item: ClassVar[int] = 1
    #: the non-finite policies this method can honour
    nonfinite_policies: ClassVar[tuple[str, ...]] = ("raise", "skip", "ignore")
    #: ``estimate`` applies ``on_nonfinite`` and rolls back on any error itself (see :meth:`Source._guarded`)
    self_guarded: ClassVar[bool] = True

    def __init__(self, model_or_params: torch.nn.Module | Iterable[torch.Tensor], *, seed: int = 0,
                 distribution: str = "gaussian", exact_restore: bool = True, comm: Comm | str | None = "auto",
                 on_nonfinite: str = "raise"):
        super().__init__(model_or_params, on_nonfinite=on_nonfinite)
        self.seed = check_int("seed", seed, 0)
        self.perturbation = Perturbation(self.params, self.seed, distribution, exact=exact_restore)
        self.distribution = distribution
        self.exact_restore = bool(exact_restore)
        self.step_count = 0
        self.comm = resolve_comm(comm, self.seed)

    # -- the estimator (what a subclass defines) --------------------------------------------------------
    @property
    @abstractmethod
    def n_items(self) -> int:
        """Units of work per step (split across ranks)."""

    @abstractmethod
    def shifts(self, item: int) -> list[tuple[int, float]]:
        """The ``per_item`` evaluations of ``item``: ``(direction index, offset a)`` for ``θ + a·z_k``."""

    @abstractmethod
    def weights(self, losses: torch.Tensor) -> tuple[Sequence[int], torch.Tensor]:
        """From every item's losses ``[n_items, per_item]`` (``[n_items, per_item, B]`` for a batched closure) to
        ``(ks, w)``: the directions and their coefficients ``w`` (``[len(ks)]``, or ``[len(ks), B]``) in ``ĝ``."""

    # -- the machinery --------------------------------------------------------------------------------------
    def scalars(self, closure: Closure, items: Sequence[int], *, keep_last: bool = False) -> torch.Tensor:
        """Losses of the given items, ``[len(items), per_item]`` (``[.., B]`` batched), float64.

        Items are evaluated last to first, so that the shift still in place at the end (``keep_last``) is along
        the first item's direction, which the update visits first and undoes in the same pass.
        """
        items = list(items)
        shifts = [s for item in reversed(items) for s in self.shifts(item)]
        policy = "raise" if self.on_nonfinite in ("raise", "skip") else "ignore"
        rows = self.perturbation.evaluate(closure, self.step_count, shifts, on_nonfinite=policy,
                                          keep_last=keep_last)
        rows = rows.reshape(len(items), self.per_item, *rows.shape[1:])
        return rows.flip(0)

    def gather(self, closure: Closure, *, keep_last: bool = False) -> torch.Tensor:
        """Every item's losses ``[n_items, per_item(, B)]``: this rank's share evaluated here, the rest received."""
        n = self.n_items
        if self.comm is None:
            return self.scalars(closure, range(n), keep_last=keep_last)

        def mine() -> torch.Tensor:
            s = self.scalars(closure, self.comm.split(n), keep_last=keep_last)
            if s.dim() == 3:
                self.perturbation.release()
                raise ValueError("per-sample (batched) losses are not split across ranks: construct the source "
                                 "with comm=None")
            return s

        try:
            return self.comm.gather_scalars(mine, n, per_item=self.per_item).reshape(n, self.per_item)
        except BaseException:
            self.perturbation.release()
            raise

    def write(self, losses: torch.Tensor) -> None:
        """Overwrite ``.grad`` with ``ĝ = Σ_k w_k z_k`` from every item's losses and advance the step."""
        ks, w = self.weights(losses)
        self.perturbation.combine(self.step_count, ks, w)
        self.step_count += 1

    def mean_loss(self, losses: torch.Tensor) -> torch.Tensor:
        """The loss ``estimate`` returns: the mean over the evaluations (one per row for a batched closure)."""
        flat = losses.reshape(-1, *losses.shape[2:])
        if losses.dim() == 3:
            return finite_mean(flat).to(self.params[0].dtype) if self.on_nonfinite == "worst" else \
                flat.mean(0).to(self.params[0].dtype)
        m = finite_mean(flat) if self.on_nonfinite == "worst" else flat.mean()
        return m.to(torch.float32)

    def estimate(self, closure: Closure) -> torch.Tensor:
        return self._guarded(self.active_params(), lambda: self._estimate(closure))

    def _estimate(self, closure: Closure) -> torch.Tensor:
        losses = self.gather(closure, keep_last=True)
        try:
            if self.on_nonfinite == "worst" and not bool(torch.isfinite(losses).any()):
                raise NonFiniteError("every loss of the population is non-finite; nothing to rank "
                                     "(on_nonfinite='worst'); nothing was updated")
            self.write(losses)
        finally:
            self.perturbation.release()
        return self.mean_loss(losses)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.seed = self.perturbation.seed = int(state["seed"])
