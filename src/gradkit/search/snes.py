"""Separable Natural Evolution Strategies (SNES): natural-gradient steps on a diagonal Gaussian.

Papers: D. Wierstra et al., "Natural Evolution Strategies" (JMLR 2014); T. Schaul, T. Glasmachers and
J. Schmidhuber, "High Dimensions and Heavy Tails for Natural Evolution Strategies" (GECCO 2011).

Rule: s_k ~ N(0, I), x_k = μ + σ ⊙ s_k, utilities u_k by rank (best first);
μ ← μ + η_μ σ ⊙ Σ u_k s_k;  σ ← σ ⊙ exp(η_σ/2 · Σ u_k (s_k² − 1)).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._validate import check_nonneg, check_positive
from .base import Bounds, Device, Searcher, TensorLike
from .shaping import FitnessShaping, resolve_shaping

__all__ = ["SNES"]


class SNES(Searcher):
    """Separable NES, minimisation.

    Args:
        x0: initial mean μ.
        sigma0: initial standard deviation σ (scalar or one per coordinate).
        popsize: λ, default ``4 + floor(3 ln d)``.
        lr_mean: η_μ (default 1, as in the paper).
        lr_sigma: η_σ (default (3 + ln d) / (5 √d), as in the paper).
        fitness_shaping: the utilities u_k, a :class:`gradkit.search.shaping.FitnessShaping` or its name (default
            ``"nes"``, the paper's rank utilities).
        tolx: stop when every standard deviation is below it (default 1e-12).
        bounds, seed, on_nonfinite, dtype, device: as for :class:`gradkit.search.Searcher` (defaults: no bounds,
            a random seed, ``"raise"``, float64, the device of ``x0``).
    """

    paper = "High Dimensions and Heavy Tails for Natural Evolution Strategies"
    _state_attrs = ("m", "sigma")

    def __init__(self, x0: TensorLike, sigma0: TensorLike, *, popsize: int | None = None, lr_mean: float = 1.0,
                 lr_sigma: float | None = None, fitness_shaping: FitnessShaping | str = "nes",
                 tolx: float = 1e-12, bounds: Bounds = None, seed: int | None = None,
                 on_nonfinite: str = "raise", dtype: torch.dtype = torch.float64, device: Device = None):
        super().__init__(x0, sigma0, popsize=popsize, bounds=bounds, seed=seed, on_nonfinite=on_nonfinite,
                         dtype=dtype, device=device)
        d = self.dim
        self.lr_mean = check_positive("lr_mean", lr_mean)
        self.lr_sigma = check_positive("lr_sigma", (3 + math.log(d)) / (5 * math.sqrt(d))
                                       if lr_sigma is None else lr_sigma)
        self.tolx = check_nonneg("tolx", tolx)
        self.shaping = resolve_shaping(fitness_shaping, "fitness_shaping")
        self.m = self.x0.clone()
        self.sigma = self.sigma0.expand(d).clone()

    def _update(self, x: torch.Tensor, f: torch.Tensor) -> None:
        order = torch.argsort(f, stable=True)
        s = (x[order] - self.m) / self.sigma
        u = -self.shaping(f)[order]  # utilities, best sample first
        self.m = self.m + self.lr_mean * self.sigma * (u @ s)
        self.sigma = self.sigma * torch.exp(self.lr_sigma / 2 * (u @ (s * s - 1)))

    def _stop_reasons(self) -> dict[str, Any]:
        s = float(self.sigma.max())
        return {"tolx": s} if self.generation > 0 and s < self.tolx else {}
