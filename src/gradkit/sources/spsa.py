"""SPSA: two-sided simultaneous-perturbation gradient estimate from function values only.

Spall, "Multivariate Stochastic Approximation Using a Simultaneous Perturbation Gradient Approximation"
(1992), in the memory-frugal form of MeZO ("Fine-Tuning Language Models with Just Forward Passes"):

    g = (1/K) Σ_k [f(θ + ε z_k) − f(θ − ε z_k)] / (2ε) · z_k,    z_k ~ N(0, I) or Rademacher,

with the ``z_k`` regenerated from seeds (never stored) and the parameters shifted in place. ``E[g] → ∇f`` as
``ε → 0`` (the bias is O(ε²) for smooth f) and the variance falls as 1/K.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .._validate import check_int, check_positive
from ..distributed import Comm
from .zeroth_order import ZerothOrder

__all__ = ["SPSA"]


class SPSA(ZerothOrder):
    """Zeroth-order gradient source (general mode: writes ``.grad``, so any transform and optimizer composes).

    Each call evaluates the closure ``2·n_directions`` times under ``torch.no_grad`` (no graph, inference
    memory) and returns the mean of those losses, ``f(θ) + O(ε²)`` — there is no extra evaluation at θ.
    Parameters are shifted in place and restored bit-exactly after every evaluation, also when the closure
    raises (see :mod:`gradkit.sources._perturb`). For the fused update with no gradient buffer at all, use
    :class:`~gradkit.sources.ZOSGD`.

    Per-sample closures: when the parameters are one tensor ``x`` of shape ``[B, ...]`` and the closure returns
    ``B`` losses, row ``b`` gets ``ĝ[b] = (1/K) Σ_k [ℓ_b(x + ε z_k) − ℓ_b(x − ε z_k)] / (2ε) · z_k[b]`` and
    ``estimate`` returns the ``B`` losses (see :class:`~gradkit.sources.ZerothOrder`).

    Distributed: when ``torch.distributed`` is initialised (``comm="auto"``, or pass a
    :class:`gradkit.distributed.Comm`), the directions are split across ranks, each rank evaluates its share,
    the per-direction losses are all-gathered, and every rank forms the same gradient, regenerating every
    direction from the shared seed. ``comm=None`` keeps every rank independent.

    Args:
        model_or_params: the module or tensors to estimate the gradient of.
        eps: the perturbation size ε (default 1e-3).
        n_directions: K, directions averaged per estimate (default 1).
        seed: seed of the directions (default 0).
        distribution: ``"gaussian"`` (default) or ``"rademacher"`` z.
        exact_restore: bit-exact restoration of the parameters after each evaluation (default True).
        comm: ``"auto"`` (default), None or a :class:`gradkit.distributed.Comm`.
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"`` (see
            :class:`~gradkit.sources.ZerothOrder`).
    """

    paper = "Multivariate Stochastic Approximation Using a Simultaneous Perturbation Gradient Approximation"
    per_item = 2

    def __init__(self, model_or_params: torch.nn.Module | Iterable[torch.Tensor], eps: float = 1e-3,
                 n_directions: int = 1, *, seed: int = 0, distribution: str = "gaussian",
                 exact_restore: bool = True, comm: Comm | str | None = "auto", on_nonfinite: str = "raise"):
        self.eps = check_positive("eps", eps)
        self.n_directions = check_int("n_directions", n_directions, 1)
        super().__init__(model_or_params, seed=seed, distribution=distribution, exact_restore=exact_restore,
                         comm=comm, on_nonfinite=on_nonfinite)

    @property
    def n_items(self) -> int:
        return self.n_directions

    def shifts(self, item: int) -> list[tuple[int, float]]:
        return [(item, self.eps), (item, -self.eps)]

    def weights(self, losses: torch.Tensor) -> tuple[Sequence[int], torch.Tensor]:
        """``w_k = (f₊ − f₋) / (2ε·K)`` for every direction ``k`` (per row for a batched closure)."""
        return range(self.n_directions), (losses[:, 0] - losses[:, 1]) / (2.0 * self.eps * self.n_directions)
