"""ES: the evolution-strategies gradient of the Gaussian-smoothed loss, from an (antithetic) population.

"Evolution Strategies as a Scalable Alternative to Reinforcement Learning" (Salimans et al., 2017), as used
for alignment in "ESSA: Evolutionary Strategies for Scalable Alignment":

    g = 1/(nσ) Σ_i w_i ε_i,   ε_i ~ N(0, I),   w_i = f(θ + σ ε_i)  (or their centred ranks),

with antithetic pairs ``ε, −ε`` (then ``g = 1/(2σ·n/2) Σ_j [f(θ+σε_j) − f(θ−σε_j)] ε_j``). Without rank shaping
``E[g] = ∇ f_σ(θ)`` for the smoothed objective ``f_σ(θ) = E f(θ + σε)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .._validate import check_int, check_positive
from ..distributed import Comm, resolve_comm
from ._perturb import Perturbation, centred_ranks
from .base import Closure, Source

__all__ = ["ES"]


class ES(Source):
    """Population gradient estimate; memory-light (members are seeds, shifted in place and restored exactly).

    ``population`` evaluations per call under ``torch.no_grad``; with ``antithetic=True`` it must be even and
    member ``2j+1`` is the mirror ``−ε_j`` of member ``2j``. ``rank_shaping=True`` replaces the losses by their
    centred ranks in [−0.5, 0.5] (robust to outliers and to the loss scale, but then the estimate is no longer
    the smoothed gradient — it is a rank-weighted search direction). Returns the population's mean loss, an
    estimate of ``f_σ(θ)``.

    Distributed: when ``torch.distributed`` is initialised (``comm="auto"``, or pass a
    :class:`gradkit.distributed.Comm`), the population is split across ranks, each rank evaluates its members
    (:meth:`scalars`), the losses are all-gathered, and every rank applies the same update (:meth:`write`),
    regenerating every member from the shared seed. ``comm=None`` keeps every rank independent.
    """

    paper = "Evolution Strategies as a Scalable Alternative to Reinforcement Learning"

    def __init__(self, model_or_params: torch.nn.Module | Iterable[torch.Tensor], sigma: float = 0.01,
                 population: int = 16, *, antithetic: bool = True, rank_shaping: bool = True, seed: int = 0,
                 exact_restore: bool = True, comm: Comm | str | None = "auto"):
        super().__init__(model_or_params)
        self.sigma = check_positive("sigma", sigma)
        self.population = check_int("population", population, 2 if antithetic else 1)
        if antithetic and population % 2:
            raise ValueError(f"population must be even when antithetic=True, got {population}")
        self.antithetic = bool(antithetic)
        self.rank_shaping = bool(rank_shaping)
        self.seed = check_int("seed", seed, 0)
        self.perturbation = Perturbation(self.params, self.seed, "gaussian", exact=exact_restore)
        self.step_count = 0
        self.comm = resolve_comm(comm, self.seed)

    def _member(self, m: int) -> tuple[int, float]:
        """(direction index, sign) of population member ``m``."""
        return (m // 2, 1.0 if m % 2 == 0 else -1.0) if self.antithetic else (m, 1.0)

    def scalars(self, closure: Closure, members: Sequence[int]) -> torch.Tensor:
        """Losses ``f(θ + σ·sign·ε_k)`` of the given population members (float64)."""
        shifts = []
        for m in members:
            k, s = self._member(m)
            shifts.append((k, s * self.sigma))
        return self.perturbation.evaluate(closure, self.step_count, shifts)

    def weights(self, losses: torch.Tensor) -> tuple[list[int], list[float]]:
        """Directions and their coefficients in ``g = Σ_k c_k ε_k`` from all members' losses."""
        f = centred_ranks(losses) if self.rank_shaping else losses
        n = self.population
        if self.antithetic:
            pairs = f.reshape(-1, 2)
            return list(range(n // 2)), ((pairs[:, 0] - pairs[:, 1]) / (n * self.sigma)).tolist()
        return list(range(n)), (f / (n * self.sigma)).tolist()

    def write(self, losses: torch.Tensor) -> None:
        """Overwrite ``.grad`` from all members' losses and advance the step."""
        ks, c = self.weights(losses)
        self.perturbation.combine(self.step_count, ks, c)
        self.step_count += 1

    def estimate(self, closure: Closure) -> torch.Tensor:
        if self.comm is None:
            losses = self.scalars(closure, range(self.population))
        else:  # each rank evaluates its share of the population; only the losses travel
            losses = self.comm.gather_scalars(lambda: self.scalars(closure, self.comm.split(self.population)),
                                              self.population)
        self.write(losses)
        return losses.mean().to(torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.seed = self.perturbation.seed = int(state["seed"])
