"""SPSA: two-sided simultaneous-perturbation gradient estimate from function values only.

Spall, "Multivariate Stochastic Approximation Using a Simultaneous Perturbation Gradient Approximation"
(1992), in the memory-frugal form of MeZO ("Fine-Tuning Language Models with Just Forward Passes"):

    g = (1/K) Σ_k [f(θ + ε z_k) − f(θ − ε z_k)] / (2ε) · z_k,    z_k ~ N(0, I) or Rademacher,

with the ``z_k`` regenerated from seeds (never stored) and the parameters shifted in place. ``E[g] → ∇f`` as
``ε → 0`` (the bias is O(ε²) for smooth f) and the variance falls as 1/K.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .._validate import check_int, check_positive
from ..distributed import Comm, resolve_comm
from ._perturb import Perturbation
from .base import Closure, Source

__all__ = ["SPSA"]


class SPSA(Source):
    """Zeroth-order gradient source (general mode: writes ``.grad``, so any transform and optimizer composes).

    Each call evaluates the closure ``2·n_directions`` times under ``torch.no_grad`` (no graph, inference
    memory) and returns the mean of those losses, ``f(θ) + O(ε²)`` — there is no extra evaluation at θ.
    Parameters are shifted in place and restored bit-exactly after every evaluation, also when the closure
    raises (see :mod:`gradkit.sources._perturb`); ``exact_restore=False`` trades that guarantee (last-bit
    drift of a few elements per step, as in MeZO) for no bookkeeping memory. For the fused update with no
    gradient buffer at all, use :class:`~gradkit.sources.ZOSGD`.

    Distributed: when ``torch.distributed`` is initialised (``comm="auto"``, or pass a
    :class:`gradkit.distributed.Comm`), the directions are split across ranks, each rank evaluates its share
    (:meth:`scalars`), the per-direction losses are all-gathered, and every rank forms the same gradient
    (:meth:`write`), regenerating every direction from the shared seed. ``comm=None`` keeps every rank
    independent.
    """

    paper = "Multivariate Stochastic Approximation Using a Simultaneous Perturbation Gradient Approximation"

    def __init__(self, model_or_params: torch.nn.Module | Iterable[torch.Tensor], eps: float = 1e-3,
                 n_directions: int = 1, *, seed: int = 0, distribution: str = "gaussian",
                 exact_restore: bool = True, comm: Comm | str | None = "auto"):
        super().__init__(model_or_params)
        self.eps = check_positive("eps", eps)
        self.n_directions = check_int("n_directions", n_directions, 1)
        self.seed = check_int("seed", seed, 0)
        self.perturbation = Perturbation(self.params, self.seed, distribution, exact=exact_restore)
        self.distribution = distribution
        self.step_count = 0
        self.comm = resolve_comm(comm, self.seed)

    def scalars(self, closure: Closure, ks: Sequence[int]) -> torch.Tensor:
        """``[len(ks), 2]`` float64: ``(f(θ + ε z_k), f(θ − ε z_k))`` for the directions ``ks`` of this step."""
        shifts = [(k, s * self.eps) for k in ks for s in (1.0, -1.0)]
        return self.perturbation.evaluate(closure, self.step_count, shifts).reshape(len(ks), 2)

    def weights(self, scalars: torch.Tensor) -> torch.Tensor:
        """Per-direction coefficients ``(f₊ − f₋) / (2ε·K)`` of ``z_k`` in the estimate."""
        return (scalars[:, 0] - scalars[:, 1]) / (2.0 * self.eps * self.n_directions)

    def write(self, scalars: torch.Tensor) -> None:
        """Overwrite ``.grad`` from the scalars of all ``n_directions`` directions and advance the step."""
        self.perturbation.combine(self.step_count, range(self.n_directions), self.weights(scalars).tolist())
        self.step_count += 1

    def estimate(self, closure: Closure) -> torch.Tensor:
        if self.comm is None:
            s = self.scalars(closure, range(self.n_directions))
        else:  # each rank evaluates its share of the directions; only the scalars travel
            s = self.comm.gather_scalars(lambda: self.scalars(closure, self.comm.split(self.n_directions)),
                                         self.n_directions, per_item=2)
        self.write(s)
        return s.mean().to(torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.seed = self.perturbation.seed = int(state["seed"])
