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
from .base import Searcher, TensorLike, check_sigma_scalar
from .cmaes import cma_weights

__all__ = ["SepCMAES"]


class SepCMAES(Searcher):
    """CMA-ES with a diagonal covariance matrix (for large ``d``), minimisation.

    Args:
        x0, sigma0: initial mean and scalar step size.
        popsize: λ, default ``4 + floor(3 ln d)``.
        active: negative recombination weights for the worst candidates (as in :class:`CMAES`).
        tolfun, tolx: termination tolerances.
        other arguments: see :class:`gradkit.search.base.Searcher`.
    """

    paper = "A Simple Modification in CMA-ES Achieving Linear Time and Space Complexity"
    _state_attrs = ("m", "sigma", "c_diag", "pc", "ps", "run_generation", "fhist", "last_frange")

    def __init__(self, x0: TensorLike, sigma0: float, *, popsize: int | None = None, bounds=None,
                 seed: int | None = None, on_nonfinite: str = "raise", active: bool = True, tolfun: float = 1e-11,
                 tolx: float = 1e-11, dtype: torch.dtype = torch.float64, device=None):
        super().__init__(x0, sigma0, popsize=popsize, bounds=bounds, seed=seed, on_nonfinite=on_nonfinite,
                         dtype=dtype, device=device)
        check_sigma_scalar(self.sigma0)
        self.active = bool(active)
        self.tolfun = check_positive("tolfun", tolfun)
        self.tolx = check_positive("tolx", tolx)
        self._set_parameters()
        kw = {"dtype": self.dtype, "device": self.device}
        self.m = self.x0.clone()
        self.sigma = float(self.sigma0)
        self.c_diag = torch.ones(self.dim, **kw)
        self.pc = torch.zeros(self.dim, **kw)
        self.ps = torch.zeros(self.dim, **kw)
        self.run_generation = 0
        self.fhist: list[float] = []
        self.last_frange = math.inf

    def _set_parameters(self) -> None:
        n, lam = self.dim, self.popsize
        raw = [math.log((lam + 1) / 2) - math.log(i + 1) for i in range(lam)]
        pos = [w for w in raw if w > 0]
        mueff = sum(pos) ** 2 / sum(w * w for w in pos)
        # The diagonal has d free parameters instead of d(d+1)/2: learn (d + 2)/3 times faster (Ros & Hansen).
        fac = (n + 2) / 3
        self.c1 = min(1.0, fac * 2 / ((n + 1.3) ** 2 + mueff))
        self.cmu = min(1 - self.c1, fac * 2 * (0.25 + mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
        w, self.mu, self.mueff = cma_weights(lam, n, self.c1, self.cmu, self.active)
        self.weights = torch.tensor(w, dtype=self.dtype, device=self.device)
        self.cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
        self.cs = (mueff + 2) / (n + mueff + 5)
        self.ds = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + self.cs
        self.chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))

    def _after_load(self) -> None:
        self._set_parameters()
        self.fhist = list(self.fhist)

    @property
    def mean(self) -> torch.Tensor:
        return self.m.clone()

    @property
    def step_size(self) -> float:
        return self.sigma

    def _sample(self) -> torch.Tensor:
        z = torch.randn(self.popsize, self.dim, generator=self.generator, dtype=self.dtype, device=self.device)
        return self.m + self.sigma * z * self.c_diag.sqrt()

    def _update(self, x: torch.Tensor, f: torch.Tensor) -> None:
        n, mu = self.dim, self.mu
        order = torch.argsort(f, stable=True)
        y = (x[order] - self.m) / self.sigma
        w = self.weights
        yw = w[:mu] @ y[:mu]
        self.m = self.m + self.sigma * yw
        sd = self.c_diag.sqrt()
        zs = y / sd
        self.ps = (1 - self.cs) * self.ps + math.sqrt(self.cs * (2 - self.cs) * self.mueff) * (w[:mu] @ zs[:mu])
        g = self.run_generation + 1
        ps_norm = float(self.ps.norm())
        hsig = ps_norm / math.sqrt(1 - (1 - self.cs) ** (2 * g)) < (1.4 + 2 / (n + 1)) * self.chi_n
        self.pc = (1 - self.cc) * self.pc + (math.sqrt(self.cc * (2 - self.cc) * self.mueff) * yw if hsig else 0.0)
        wo = w.clone()
        if self.active and self.popsize > mu:
            wo[mu:] = w[mu:] * n / (zs[mu:] ** 2).sum(1).clamp_min(1e-300)
        delta_h = (1 - float(hsig)) * self.cc * (2 - self.cc)
        decay = 1 + self.c1 * delta_h - self.c1 - self.cmu * float(w.sum())
        self.c_diag = (decay * self.c_diag + self.c1 * self.pc ** 2 + self.cmu * (wo @ (y * y))).clamp_min(1e-300)
        self.sigma *= math.exp(min(1.0, (self.cs / self.ds) * (ps_norm / self.chi_n - 1)))
        self.run_generation = g
        self.fhist.append(float(f[order[0]]))
        keep = 10 + int(math.ceil(30 * n / self.popsize))
        if len(self.fhist) > keep:
            del self.fhist[: len(self.fhist) - keep]
        self.last_frange = float(f.max() - f.min())

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
