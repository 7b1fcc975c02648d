"""The cross-entropy method with a diagonal Gaussian and smoothed elite refits.

Paper: "Safe Learning-based Gradient-free Model Predictive Control Based on Cross-entropy Method"
(CEM as used there: sample, keep the elites, refit the Gaussian, smooth with the previous one).

Rule: E = the ⌈ρλ⌉ best of λ samples x_k ~ N(m, diag σ²);
m ← α m + (1 − α) mean(E);  σ ← α σ + (1 − α) std(E), floored at ``sigma_min``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._validate import check_nonneg, check_range
from .base import Bounds, Device, Searcher, TensorLike, default_popsize

__all__ = ["CEM"]


class CEM(Searcher):
    """Cross-entropy method (diagonal Gaussian), minimisation.

    Args:
        x0: initial mean m.
        sigma0: initial standard deviation σ (scalar or one per coordinate).
        popsize: λ, samples per generation, default ``10·(4 + floor(3 ln d))``: CEM refits its variance from the
            elites alone and collapses prematurely with small populations (100 at d = 10 converges on the
            sphere; 40 does not).
        elite_ratio: ρ, the fraction of the population refitted (default 0.2; at least 2 elites).
        smoothing: α, the weight of the previous mean/std in the refit (default 0: plain CEM).
        sigma_min: floor on every standard deviation (default 0, which lets CEM converge; > 0 keeps exploring).
        tolx: stop when every standard deviation is below it (default 1e-12).
        bounds, seed, on_nonfinite, dtype, device: as for :class:`gradkit.search.Searcher` (defaults: no bounds,
            a random seed, ``"raise"``, float64, the device of ``x0``).
    """

    paper = "Safe Learning-based Gradient-free Model Predictive Control Based on Cross-entropy Method"
    min_popsize = 4
    _state_attrs = ("m", "sigma")

    def __init__(self, x0: TensorLike, sigma0: TensorLike, *, popsize: int | None = None,
                 elite_ratio: float = 0.2, smoothing: float = 0.0, sigma_min: float = 0.0, tolx: float = 1e-12,
                 bounds: Bounds = None, seed: int | None = None, on_nonfinite: str = "raise",
                 dtype: torch.dtype = torch.float64, device: Device = None):
        super().__init__(x0, sigma0, popsize=popsize, bounds=bounds, seed=seed, on_nonfinite=on_nonfinite,
                         dtype=dtype, device=device)
        self.elite_ratio = check_range("elite_ratio", elite_ratio, 0.0, 1.0, low_open=True)
        self.n_elites = max(2, int(math.ceil(self.elite_ratio * self.popsize)))
        if self.n_elites > self.popsize:
            raise ValueError(f"popsize must allow at least 2 elites, got popsize={self.popsize}")
        self.smoothing = check_range("smoothing", smoothing, 0.0, 1.0, high_open=True)
        self.sigma_min = check_nonneg("sigma_min", sigma_min)
        self.tolx = check_nonneg("tolx", tolx)
        self.m = self.x0.clone()
        self.sigma = self.sigma0.expand(self.dim).clone()

    def default_popsize(self, d: int) -> int:
        return 10 * default_popsize(d)

    def _after_load(self) -> None:
        self.n_elites = max(2, int(math.ceil(self.elite_ratio * self.popsize)))

    def _update(self, x: torch.Tensor, f: torch.Tensor) -> None:
        elites = x[torch.argsort(f, stable=True)[: self.n_elites]]
        a = self.smoothing
        self.m = a * self.m + (1 - a) * elites.mean(0)
        self.sigma = (a * self.sigma + (1 - a) * elites.std(0, correction=0)).clamp_min(self.sigma_min)

    def _stop_reasons(self) -> dict[str, Any]:
        s = float(self.sigma.max())
        return {"tolx": s} if self.generation > 0 and s < self.tolx else {}
