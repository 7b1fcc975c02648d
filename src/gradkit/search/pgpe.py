"""Policy Gradients with Parameter-based Exploration (PGPE) with symmetric sampling.

Paper: F. Sehnke et al., "Parameter-exploring policy gradients" (Neural Networks, 2010).

Rule (minimising f, r = centred-rank utility of −f): pairs x± = μ ± ε, ε ~ N(0, diag σ²);
∇μ = mean_i ε_i (r⁺_i − r⁻_i)/2,  ∇σ = mean_i ((r⁺_i + r⁻_i)/2 − b)(ε_i² − σ²)/σ;
μ ← μ + η_μ·step(∇μ) (plain or Adam), σ ← σ + η_σ ∇σ with the relative change of σ clipped.
"""

from __future__ import annotations

from typing import Any

import torch

from .._validate import check_nonneg, check_positive
from .base import Bounds, Device, MirroredSearcher, TensorLike
from .mean_optim import SGD, MeanOptimizer
from .shaping import FitnessShaping, resolve_shaping

__all__ = ["PGPE"]


class PGPE(MirroredSearcher):
    """PGPE with symmetric (antithetic) sampling and centred-rank fitness shaping, minimisation.

    Args:
        x0: initial mean μ.
        sigma0: initial exploration standard deviation σ (scalar or one per coordinate).
        popsize: an even number of candidates (pairs μ ± ε); default the even number ≥ ``4 + floor(3 ln d)``.
        lr_mean: η_μ. With the plain gradient step the update is ``η_μ ∇μ`` (default η_μ = 1; ∇μ is in units of
            x); with Adam each coordinate moves about ``η_μ`` per generation (default ``0.2 · mean(sigma0)``).
        lr_sigma: η_σ (default 0.1).
        optimizer: the mean's update rule: ``"adam"`` (default), ``"sgd"`` (the paper's plain gradient step) or a
            :class:`gradkit.search.mean_optim.MeanOptimizer` (its ``lr`` None takes ``lr_mean``).
        max_sigma_change: bound on the relative change of σ per generation (default 0.2, as EvoTorch).
        fitness_shaping: a :class:`gradkit.search.shaping.FitnessShaping` or its name (default centred ranks).
        tolx: stop when every σ is below it (default 1e-12).
        bounds, seed, on_nonfinite, dtype, device: as for :class:`gradkit.search.Searcher` (defaults: no bounds,
            a random seed, ``"raise"``, float64, the device of ``x0``).
    """

    paper = "Parameter-exploring policy gradients"
    _state_attrs = ("m", "sigma")

    def __init__(self, x0: TensorLike, sigma0: TensorLike, *, popsize: int | None = None,
                 lr_mean: float | None = None, lr_sigma: float = 0.1, optimizer: MeanOptimizer | str = "adam",
                 max_sigma_change: float = 0.2, fitness_shaping: FitnessShaping | str = "centred_ranks",
                 tolx: float = 1e-12, bounds: Bounds = None, seed: int | None = None, on_nonfinite: str = "raise",
                 dtype: torch.dtype = torch.float64, device: Device = None):
        sigma_mean = float(torch.as_tensor(sigma0, dtype=torch.float64).mean())
        plain = optimizer == "sgd" or isinstance(optimizer, SGD)
        default_lr = (1.0 if plain else 0.2 * sigma_mean) if lr_mean is None else lr_mean
        super().__init__(x0, sigma0, popsize=popsize, bounds=bounds, seed=seed, on_nonfinite=on_nonfinite,
                         dtype=dtype, device=device, optimizer=optimizer, default_lr=default_lr)
        self.lr_sigma = check_nonneg("lr_sigma", lr_sigma)
        self.max_sigma_change = check_positive("max_sigma_change", max_sigma_change)
        self.shaping = resolve_shaping(fitness_shaping, "fitness_shaping")
        self.tolx = check_nonneg("tolx", tolx)

    @property
    def lr_mean(self) -> float:
        return self.mean_optimizer.lr

    def _update(self, x: torch.Tensor, f: torch.Tensor) -> None:
        r = -self.shaping(f)  # reward: best (lowest f) gets +0.5 with centred ranks
        rp, rm = r[0::2], r[1::2]
        # ε from the evaluated pair (its half-difference stays exact under clipping to the bounds).
        eps = (x[0::2] - x[1::2]) / 2
        grad_m = ((rp - rm)[:, None] / 2 * eps).mean(0)
        baseline = r.mean()
        grad_s = ((((rp + rm) / 2 - baseline)[:, None]) * (eps * eps - self.sigma ** 2) / self.sigma).mean(0)
        self._descend(-grad_m)  # ascent on the reward
        # Bounded relative change keeps σ positive and stops one lucky generation from collapsing it.
        delta = (self.lr_sigma * grad_s).clamp(-self.max_sigma_change * self.sigma,
                                               self.max_sigma_change * self.sigma)
        self.sigma = self.sigma + delta

    def _stop_reasons(self) -> dict[str, Any]:
        s = float(self.sigma.max())
        return {"tolx": s} if self.generation > 0 and s < self.tolx else {}
