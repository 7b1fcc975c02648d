"""Separable CMA-ES: a diagonal covariance, so time and memory are linear in the dimension.

Paper: R. Ros and N. Hansen, "A Simple Modification in CMA-ES Achieving Linear Time and Space Complexity"
(PPSN 2008).

Rule: x_k = m + σ·(c ⊙ z_k) with c = √diag(C); the CMA-ES updates restricted to the diagonal,
diag(C) ← (1 − c1 − cμ Σw) diag(C) + c1 p_c² + cμ Σ_i w°_i y_i², with c1 and cμ multiplied by (d + 2)/3.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._validate import check_positive
from .base import Bounds, Device, TensorLike, check_sigma_scalar
from .cmaes import _CMA

__all__ = ["SepCMAES"]


class SepCMAES(_CMA):
    """CMA-ES with a diagonal covariance matrix (for large ``d``), minimisation.

    Args:
        x0: initial mean m₀.
        sigma0: initial (scalar) step size σ₀.
        popsize: λ, default ``4 + floor(3 ln d)``.
        active: negative recombination weights for the worst candidates (default True, as in :class:`CMAES`).
        tolfun: stop when the recent fitness range is below it (default 1e-11).
        tolx: stop when every step length is below it (default 1e-11).
        bounds, seed, on_nonfinite, dtype, device: as for :class:`gradkit.search.Searcher` (defaults: no bounds,
            a random seed, ``"raise"``, float64, the device of ``x0``).
    """

    paper = "A Simple Modification in CMA-ES Achieving Linear Time and Space Complexity"
    diagonal = True
    _state_attrs = ("m", "sigma", "c_diag", "pc", "ps", "run_generation", "fhist", "last_frange")

    def __init__(self, x0: TensorLike, sigma0: float, *, popsize: int | None = None, bounds: Bounds = None,
                 seed: int | None = None, on_nonfinite: str = "raise", active: bool = True, tolfun: float = 1e-11,
                 tolx: float = 1e-11, dtype: torch.dtype = torch.float64, device: Device = None):
        super().__init__(x0, sigma0, popsize=popsize, bounds=bounds, seed=seed, on_nonfinite=on_nonfinite,
                         dtype=dtype, device=device)
        check_sigma_scalar(self.sigma0)
        self.active = bool(active)
        self.tolfun = check_positive("tolfun", tolfun)
        self.tolx = check_positive("tolx", tolx)
        self._set_constants()
        kw = {"dtype": self.dtype, "device": self.device}
        self.m = self.x0.clone()
        self.sigma = float(self.sigma0)
        self.c_diag = torch.ones(self.dim, **kw)
        self.pc = torch.zeros(self.dim, **kw)
        self.ps = torch.zeros(self.dim, **kw)
        self.run_generation = 0
        self.fhist: list[float] = []
        self.last_frange = math.inf

    def _after_load(self) -> None:
        super()._after_load()
        self._set_constants()

    def _sample(self) -> torch.Tensor:
        return self.m + self.sigma * self._randn(self.popsize) * self.c_diag.sqrt()

    def _whiten(self, y: torch.Tensor) -> torch.Tensor:
        return y / self.c_diag.sqrt()

    def _adapt_covariance(self, y: torch.Tensor, wo: torch.Tensor, decay: float) -> None:
        self.c_diag = (decay * self.c_diag + self.c1 * self.pc ** 2 + self.cmu * (wo @ (y * y))).clamp_min(1e-300)

    def _stop_reasons(self) -> dict[str, Any]:
        if self.run_generation < 2:
            return {}
        out: dict[str, Any] = {}
        frange = max(max(self.fhist) - min(self.fhist), self.last_frange)
        if frange < self.tolfun:
            out["tolfun"] = frange
        sd = self.sigma * self.c_diag.sqrt()
        if float(torch.maximum(sd, self.sigma * self.pc.abs()).max()) < self.tolx:
            out["tolx"] = float(sd.max())
        cond = float(self.c_diag.max() / self.c_diag.min())
        if cond > 1e14:
            out["conditioncov"] = cond
        if bool((self.m == self.m + 0.2 * sd).any()):
            out["noeffectcoord"] = True
        return out
