"""OpenAI-ES: a Gaussian-smoothed gradient from mirrored samples, stepped with Adam.

Paper: T. Salimans et al., "Evolution Strategies as a Scalable Alternative to Reinforcement Learning" (2017).

Rule: x± = θ ± σ ε_i, ε_i ~ N(0, I), F = centred ranks of f;  g = Σ_k F_k ε_k / (λ σ);  θ ← Adam(θ, g)
(σ fixed; optional L2 weight decay on θ, as in the paper). The coefficients F_k / λ come from
:func:`gradkit.search.shaping.es_weights`, the estimator :class:`gradkit.sources.ES` uses too.
"""

from __future__ import annotations

import torch

from .._validate import check_betas, check_nonneg
from .base import Bounds, Device, MirroredSearcher, TensorLike
from .mean_optim import Adam, MeanOptimizer
from .shaping import FitnessShaping, es_weights, resolve_shaping

__all__ = ["OpenAIES"]


class OpenAIES(MirroredSearcher):
    """OpenAI evolution strategy (mirrored sampling, centred ranks, Adam), minimisation.

    Args:
        x0: initial parameters θ.
        sigma0: the fixed noise scale σ (scalar or one per coordinate).
        popsize: λ, an even number of candidates; default the even number ≥ ``4 + floor(3 ln d)``.
        lr: the learning rate of θ; default ``sigma0 / 2`` (the paper: σ = 0.02, lr = 0.01).
        weight_decay: L2 coefficient added to the gradient estimate (default 0).
        betas: Adam's (β₁, β₂) when ``optimizer`` is None (default (0.9, 0.999)).
        optimizer: the mean's update rule, a :class:`gradkit.search.mean_optim.MeanOptimizer` (its ``lr`` None
            takes ``lr``) or ``"adam"`` / ``"sgd"``; default Adam with ``betas``.
        fitness_shaping: a :class:`gradkit.search.shaping.FitnessShaping` or its name (default centred ranks).
        bounds, seed, on_nonfinite, dtype, device: as for :class:`gradkit.search.Searcher` (defaults: no bounds,
            a random seed, ``"raise"``, float64, the device of ``x0``).
    """

    paper = "Evolution Strategies as a Scalable Alternative to Reinforcement Learning"
    _state_attrs = ("m", "sigma")

    def __init__(self, x0: TensorLike, sigma0: TensorLike, *, popsize: int | None = None, lr: float | None = None,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 optimizer: MeanOptimizer | str | None = None, fitness_shaping: FitnessShaping | str = "centred_ranks",
                 bounds: Bounds = None, seed: int | None = None, on_nonfinite: str = "raise",
                 dtype: torch.dtype = torch.float64, device: Device = None):
        sigma_mean = float(torch.as_tensor(sigma0, dtype=torch.float64).mean())
        if optimizer is None:
            optimizer = Adam(lr, check_betas("betas", betas, 2))
        super().__init__(x0, sigma0, popsize=popsize, bounds=bounds, seed=seed, on_nonfinite=on_nonfinite,
                         dtype=dtype, device=device, optimizer=optimizer,
                         default_lr=0.5 * sigma_mean if lr is None else lr)
        self.weight_decay = check_nonneg("weight_decay", weight_decay)
        self.shaping = resolve_shaping(fitness_shaping, "fitness_shaping")

    @property
    def lr(self) -> float:
        return self.mean_optimizer.lr

    def gradient(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The search-gradient estimate of f at θ from evaluated candidates (descent direction is −g)."""
        eps = (x - self.m) / self.sigma
        return es_weights(f, self.shaping) @ eps / self.sigma

    def _update(self, x: torch.Tensor, f: torch.Tensor) -> None:
        self._descend(self.gradient(x, f) + self.weight_decay * self.m)
