"""ES: the evolution-strategies gradient of the Gaussian-smoothed loss, from an (antithetic) population.

"Evolution Strategies as a Scalable Alternative to Reinforcement Learning" (Salimans et al., 2017), as used
for alignment in "ESSA: Evolutionary Strategies for Scalable Alignment":

    g = 1/(nσ) Σ_i F_i ε_i,   ε_i ~ N(0, I),   F_i = f(θ + σ ε_i)  (or their centred ranks),

with antithetic pairs ``ε, −ε`` (then ``g = 1/(nσ) Σ_j (F_j⁺ − F_j⁻) ε_j``). Without rank shaping
``E[g] = ∇ f_σ(θ)`` for the smoothed objective ``f_σ(θ) = E f(θ + σε)``. The coefficients come from
:func:`gradkit.search.shaping.es_weights`, the estimator :class:`gradkit.search.OpenAIES` uses too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .._validate import check_int, check_positive
from ..distributed import Comm
from ..search.shaping import FitnessShaping, Raw, es_weights, resolve_shaping
from .zeroth_order import ZerothOrder

__all__ = ["ES"]


class ES(ZerothOrder):
    """Population gradient estimate; memory-light (members are seeds, shifted in place and restored exactly).

    ``population`` evaluations per call under ``torch.no_grad``; with ``antithetic=True`` it must be even and
    member ``2j+1`` is the mirror ``−ε_j`` of member ``2j``. Rank shaping (the default) replaces the losses by
    their centred ranks in [−0.5, 0.5] (robust to outliers and to the loss scale, but then the estimate is no
    longer the smoothed gradient — it is a rank-weighted search direction). Returns the population's mean loss,
    an estimate of ``f_σ(θ)``.

    Per-sample closures: when the parameters are one tensor of shape ``[B, ...]`` and the closure returns ``B``
    losses, every row is its own population (ranks are taken per row) and uses only its row of each member.

    Distributed: when ``torch.distributed`` is initialised (``comm="auto"``, or pass a
    :class:`gradkit.distributed.Comm`), the population is split across ranks, each rank evaluates its members,
    the losses are all-gathered, and every rank applies the same update, regenerating every member from the
    shared seed. ``comm=None`` keeps every rank independent.

    Args:
        model_or_params: the module or tensors to estimate the gradient of.
        sigma: σ, the standard deviation of the perturbations (default 0.01).
        population: n, members per estimate (default 16; even when antithetic).
        antithetic: mirrored pairs ``ε, −ε`` (default True).
        rank_shaping: True (default: centred ranks), False (raw losses: the unbiased smoothed gradient), or a
            :class:`gradkit.search.shaping.FitnessShaping` object.
        seed: seed of the members (default 0).
        exact_restore: bit-exact restoration of the parameters after each evaluation (default True).
        comm: ``"auto"`` (default), None or a :class:`gradkit.distributed.Comm`.
        on_nonfinite: ``"raise"`` (default), ``"skip"``, ``"worst"`` (non-finite members rank last; with raw
            losses they — and their antithetic partner — get weight 0) or ``"ignore"``.
    """

    paper = "Evolution Strategies as a Scalable Alternative to Reinforcement Learning"
    nonfinite_policies = ("raise", "skip", "worst", "ignore")

    def __init__(self, model_or_params: torch.nn.Module | Iterable[torch.Tensor], sigma: float = 0.01,
                 population: int = 16, *, antithetic: bool = True, rank_shaping: bool | FitnessShaping = True,
                 seed: int = 0, exact_restore: bool = True, comm: Comm | str | None = "auto",
                 on_nonfinite: str = "raise"):
        self.sigma = check_positive("sigma", sigma)
        self.population = check_int("population", population, 2 if antithetic else 1)
        if antithetic and population % 2:
            raise ValueError(f"population must be even when antithetic=True, got {population}")
        self.antithetic = bool(antithetic)
        self.shaping = resolve_shaping(rank_shaping, "rank_shaping")
        self.rank_shaping = not isinstance(self.shaping, Raw)
        super().__init__(model_or_params, seed=seed, distribution="gaussian", exact_restore=exact_restore,
                         comm=comm, on_nonfinite=on_nonfinite)

    @property
    def n_items(self) -> int:
        return self.population

    def _member(self, m: int) -> tuple[int, float]:
        """(direction index, sign) of population member ``m``."""
        return (m // 2, 1.0 if m % 2 == 0 else -1.0) if self.antithetic else (m, 1.0)

    def shifts(self, item: int) -> list[tuple[int, float]]:
        k, s = self._member(item)
        return [(k, s * self.sigma)]

    def weights(self, losses: torch.Tensor) -> tuple[Sequence[int], torch.Tensor]:
        """Directions and their coefficients in ``g = Σ_k c_k ε_k`` from every member's loss."""
        f = losses[:, 0]
        drop = self.on_nonfinite == "worst" and isinstance(self.shaping, Raw)
        ok = torch.isfinite(f)
        c = es_weights(torch.where(ok, f, torch.zeros_like(f)) if drop else f, self.shaping, self.sigma)
        if not self.antithetic:
            return range(self.population), torch.where(ok, c, torch.zeros_like(c)) if drop else c
        half = self.population // 2
        pairs = c.reshape(half, 2, *c.shape[1:])
        coef = pairs[:, 0] - pairs[:, 1]
        if drop:  # a pair's difference means nothing when one side is missing: the whole pair weighs 0
            coef = torch.where(ok.reshape(half, 2, *ok.shape[1:]).all(1), coef, torch.zeros_like(coef))
        return range(half), coef
