"""CMA-ES with full covariance, cumulative step-size adaptation and active (negative-weight) updates.

Paper: N. Hansen, "The CMA Evolution Strategy: A Tutorial" (arXiv:1604.00772); IPOP restarts: A. Auger and
N. Hansen, "A Restart CMA Evolution Strategy With Increasing Population Size" (CEC 2005).

Rule: x_k = m + σ·B·D·z_k; m ← m + Σ_{i≤μ} w_i (x_{i:λ} − m);
C ← (1 − c1 − cμ Σw) C + c1 p_c p_cᵀ + cμ Σ_i w°_i y_i y_iᵀ;  σ ← σ · exp(c_σ/d_σ (‖p_σ‖/E‖N(0,I)‖ − 1)).
All defaults are the tutorial's Table 1 (including its negative recombination weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .._validate import check_int, check_positive, check_range
from .base import Bounds, Device, Searcher, TensorLike, check_sigma_scalar

__all__ = ["CMAES", "CMAConstants", "cma_constants", "cma_weights"]


def cma_weights(popsize: int, d: int, c1: float, cmu: float, active: bool) -> tuple[list[float], int, float]:
    """Recombination weights of the tutorial (Table 1): positive for the best μ, negative (active) for the rest.

    Returns ``(weights, mu, mueff)``; the negative weights are scaled so the covariance stays positive definite.
    """
    raw = [math.log((popsize + 1) / 2) - math.log(i + 1) for i in range(popsize)]
    mu = popsize // 2
    pos = [w for w in raw if w > 0]
    neg = [w for w in raw if w < 0]
    mueff = sum(pos) ** 2 / sum(w * w for w in pos)
    weights = [w / sum(pos) if w > 0 else 0.0 for w in raw]
    if active and neg and cmu > 0:
        mueff_neg = sum(neg) ** 2 / sum(w * w for w in neg)
        alpha_mu = 1 + c1 / cmu
        alpha_mueff = 1 + 2 * mueff_neg / (mueff + 2)
        alpha_posdef = (1 - c1 - cmu) / (d * cmu)
        scale = min(alpha_mu, alpha_mueff, alpha_posdef) / sum(abs(w) for w in neg)
        weights = [w if r >= 0 else r * scale for w, r in zip(weights, raw)]
    return weights, mu, mueff


@dataclass(frozen=True)
class CMAConstants:
    """The strategy parameters of CMA-ES (tutorial, Table 1), computed once by :func:`cma_constants`.

    Args:
        weights: w_i, the recombination weights (negative for the worst λ − μ with active CMA).
        mu: μ, the number of parents.
        mueff: μ_eff, the variance-effective selection mass.
        c1: c₁, the rank-one learning rate of the covariance.
        cmu: c_μ, its rank-μ learning rate.
        cc: c_c, the cumulation constant of the covariance path.
        cs: c_σ, the cumulation constant of the step-size path.
        ds: d_σ, the step-size damping.
        chi_n: E‖N(0, I)‖.
    """

    weights: tuple[float, ...]
    mu: int
    mueff: float
    c1: float
    cmu: float
    cc: float
    cs: float
    ds: float
    chi_n: float


def cma_constants(n: int, popsize: int, active: bool = True, diagonal: bool = False) -> CMAConstants:
    """Default strategy parameters for dimension ``n`` and population λ = ``popsize``.

    ``diagonal=True`` (sep-CMA-ES, Ros & Hansen): the diagonal has n free parameters instead of n(n+1)/2, so c₁
    and c_μ are (n + 2)/3 times larger.
    """
    raw = [math.log((popsize + 1) / 2) - math.log(i + 1) for i in range(popsize)]
    pos = [w for w in raw if w > 0]
    mueff = sum(pos) ** 2 / sum(w * w for w in pos)
    fac = (n + 2) / 3 if diagonal else 1.0
    c1 = min(1.0, fac * 2 / ((n + 1.3) ** 2 + mueff))
    cmu = min(1 - c1, fac * 2 * (0.25 + mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
    w, mu, mueff = cma_weights(popsize, n, c1, cmu, active)
    return CMAConstants(
        weights=tuple(w), mu=mu, mueff=mueff, c1=c1, cmu=cmu,
        cc=(4 + mueff / n) / (n + 4 + 2 * mueff / n),
        cs=(mueff + 2) / (n + mueff + 5),
        ds=1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + (mueff + 2) / (n + mueff + 5),
        chi_n=math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n)),
    )


class _CMA(Searcher):
    """What CMA-ES and sep-CMA-ES share: weighted recombination, both evolution paths, active weights, CSA.

    A subclass says how its covariance model whitens a step (``_whiten``: C^{-1/2} y), how it adapts
    (``_adapt_covariance``), and what else it does after a generation (``_after_generation``).
    """

    diagonal = False

    def _set_constants(self) -> None:
        k = cma_constants(self.dim, self.popsize, self.active, self.diagonal)
        self.constants = k
        self.weights = torch.tensor(k.weights, dtype=self.dtype, device=self.device)
        self.mu, self.mueff, self.c1, self.cmu = k.mu, k.mueff, k.c1, k.cmu
        self.cc, self.cs, self.ds, self.chi_n = k.cc, k.cs, k.ds, k.chi_n

    @property
    def step_size(self) -> float:
        """The global step size σ."""
        return self.sigma

    def _after_load(self) -> None:
        self.fhist = list(self.fhist)

    def _whiten(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _adapt_covariance(self, y: torch.Tensor, wo: torch.Tensor, decay: float) -> None:
        raise NotImplementedError

    def _after_generation(self, f: torch.Tensor, order: torch.Tensor) -> None:
        pass

    def _update(self, x: torch.Tensor, f: torch.Tensor) -> None:
        n, lam, mu = self.dim, self.popsize, self.mu
        order = torch.argsort(f, stable=True)
        y = (x[order] - self.m) / self.sigma  # [λ, d], best first
        w = self.weights
        yw = w[:mu] @ y[:mu]
        self.m = self.m + self.sigma * yw
        white = self._whiten(y)  # C^{-1/2} y: the step-size path and the active weights
        self.ps = (1 - self.cs) * self.ps + math.sqrt(self.cs * (2 - self.cs) * self.mueff) * (w[:mu] @ white[:mu])
        g = self.run_generation + 1
        ps_norm = float(self.ps.norm())
        hsig = ps_norm / math.sqrt(1 - (1 - self.cs) ** (2 * g)) < (1.4 + 2 / (n + 1)) * self.chi_n
        self.pc = (1 - self.cc) * self.pc + (math.sqrt(self.cc * (2 - self.cc) * self.mueff) * yw if hsig else 0.0)
        wo = w.clone()
        if self.active and lam > mu:
            # Negative weights act on directions rescaled to length √d in the C-metric (tutorial eq. 46).
            wo[mu:] = w[mu:] * n / (white[mu:] ** 2).sum(1).clamp_min(1e-300)
        delta_h = (1 - float(hsig)) * self.cc * (2 - self.cc)
        decay = 1 + self.c1 * delta_h - self.c1 - self.cmu * float(w.sum())
        self._adapt_covariance(y, wo, decay)
        self.sigma *= math.exp(min(1.0, (self.cs / self.ds) * (ps_norm / self.chi_n - 1)))
        self.run_generation = g
        self.fhist.append(float(f[order[0]]))  # best fitness of recent generations (termination)
        keep = 10 + int(math.ceil(30 * n / lam))
        if len(self.fhist) > keep:
            del self.fhist[: len(self.fhist) - keep]
        self.last_frange = float(f.max() - f.min())
        self._after_generation(f, order)


class CMAES(_CMA):
    """Covariance Matrix Adaptation Evolution Strategy (full covariance), minimisation.

    Args:
        x0: initial mean m₀; the optimum should lie within ``x0 ± 3·sigma0``.
        sigma0: initial (scalar) step size σ₀.
        popsize: λ, default ``4 + floor(3 ln d)``; μ = λ // 2 parents.
        active: negative weights for the worst λ − μ candidates (default True, the tutorial's; pycma's
            ``CMA_active``).
        restarts: IPOP: when a termination criterion holds, restart with the population multiplied by
            ``incpopsize``, up to ``restarts`` times (default 0); ``stop()`` is True only after the last run stops.
        incpopsize: the factor of λ at each restart (default 2).
        restart_from: ``"x0"`` (default: restart at ``x0``) or ``"uniform"`` (a uniform point in ``bounds``).
        tolfun: stop when the recent fitness range is below it (default 1e-11).
        tolx: stop when every step length is below it (default 1e-11).
        max_iter: generations per run before stopping (default as pycma: 100 + 150 (d+3)² / √λ).
        bounds, seed, on_nonfinite, dtype, device: as for :class:`gradkit.search.Searcher` (defaults: no bounds,
            a random seed, ``"raise"``, float64, the device of ``x0``).
    """

    paper = "The CMA Evolution Strategy: A Tutorial"
    _state_attrs = ("x0", "sigma0", "m", "sigma", "C", "B", "D", "pc", "ps", "eigen_gen", "restarts_done",
                    "run_generation", "fhist", "fbest_run", "sigma_run0", "last_frange")

    def __init__(self, x0: TensorLike, sigma0: float, *, popsize: int | None = None,
                 bounds: Bounds = None, seed: int | None = None, on_nonfinite: str = "raise", active: bool = True,
                 restarts: int = 0, incpopsize: float = 2.0, restart_from: str = "x0", tolfun: float = 1e-11,
                 tolx: float = 1e-11, max_iter: int | None = None, dtype: torch.dtype = torch.float64,
                 device: Device = None):
        super().__init__(x0, sigma0, popsize=popsize, bounds=bounds, seed=seed, on_nonfinite=on_nonfinite,
                         dtype=dtype, device=device)
        check_sigma_scalar(self.sigma0)
        self.active = bool(active)
        self.restarts = check_int("restarts", restarts)
        self.incpopsize = check_range("incpopsize", incpopsize, 1.0, low_open=True)
        if restart_from not in ("x0", "uniform"):
            raise ValueError(f"restart_from must be 'x0' or 'uniform', got {restart_from!r}")
        if restart_from == "uniform" and self.lower is None:
            raise ValueError("restart_from='uniform' needs bounds")
        self.restart_from = restart_from
        self.tolfun = check_positive("tolfun", tolfun)
        self.tolx = check_positive("tolx", tolx)
        self.max_iter = None if max_iter is None else check_int("max_iter", max_iter, 1)
        self.restarts_done = 0
        self._init_run(self.x0, self.popsize)

    # ---- strategy parameters (recomputed from popsize, never saved) -------------------------------------
    def _set_parameters(self, popsize: int) -> None:
        n = self.dim
        self.popsize = popsize
        self._set_constants()
        # Eigendecomposition costs O(d³); the tutorial recommends it every 1/(10 d (c1 + cμ)) generations.
        self.eigen_every = max(1, int(1 / (10 * n * (self.c1 + self.cmu))))
        self.max_gen = (self.max_iter if self.max_iter is not None
                        else int(100 + 150 * (n + 3) ** 2 / math.sqrt(popsize)))

    def _init_run(self, m: torch.Tensor, popsize: int) -> None:
        self._set_parameters(popsize)
        n, kw = self.dim, {"dtype": self.dtype, "device": self.device}
        self.m = m.clone()
        self.sigma = float(self.sigma0)
        self.sigma_run0 = self.sigma
        self.C = torch.eye(n, **kw)
        self.B = torch.eye(n, **kw)
        self.D = torch.ones(n, **kw)
        self.pc = torch.zeros(n, **kw)
        self.ps = torch.zeros(n, **kw)
        self.eigen_gen = 0
        self.run_generation = 0
        self.fhist: list[float] = []  # best fitness of recent generations of this run (termination)
        self.fbest_run = math.inf
        self.last_frange = math.inf

    def _after_load(self) -> None:
        super()._after_load()
        self._set_parameters(int(self.popsize))

    @property
    def covariance(self) -> torch.Tensor:
        return self.C.clone()

    def _sample(self) -> torch.Tensor:
        return self.m + self.sigma * (self._randn(self.popsize) * self.D) @ self.B.T

    def _whiten(self, y: torch.Tensor) -> torch.Tensor:
        return ((y @ self.B) / self.D) @ self.B.T  # B D^{-1} Bᵀ y

    def _adapt_covariance(self, y: torch.Tensor, wo: torch.Tensor, decay: float) -> None:
        # In place: at large d the d×d passes dominate a generation; C is symmetrised only before eigh.
        self.C = self.C * decay  # a fresh tensor, so a state_dict taken earlier is never modified
        self.C.addr_(self.pc, self.pc, alpha=self.c1)
        self.C.addmm_(y.T * wo, y, alpha=self.cmu)

    def _after_generation(self, f: torch.Tensor, order: torch.Tensor) -> None:
        if self.run_generation - self.eigen_gen >= self.eigen_every:
            self._eigen()
        self.fbest_run = min(self.fbest_run, float(f[order[0]]))
        if self.restarts_done < self.restarts and self._run_stop_reasons():
            self._restart()

    def _eigen(self) -> None:
        self.C = (self.C + self.C.T) / 2
        evals, evecs = torch.linalg.eigh(self.C)
        evals = evals.clamp_min(1e-300)
        self.D = evals.sqrt()
        self.B = evecs
        self.eigen_gen = self.run_generation

    def _restart(self) -> None:
        self.restarts_done += 1
        pop = int(round(self.popsize * self.incpopsize))
        if self.restart_from == "uniform":
            u = torch.rand(self.dim, generator=self.generator, dtype=self.dtype, device=self.device)
            m = self.lower + u * (self.upper - self.lower)
        else:
            m = self.x0
        self._init_run(m, pop)

    def _run_stop_reasons(self) -> dict[str, Any]:
        if self.run_generation == 0:
            return {}
        out: dict[str, Any] = {}
        n = self.dim
        frange = max(self.fhist) - min(self.fhist) if self.fhist else math.inf
        frange = max(frange, self.last_frange)
        if self.run_generation > 1 and frange < self.tolfun:
            out["tolfun"] = frange
        sd = self.sigma * torch.sqrt(torch.diagonal(self.C))
        if float(torch.maximum(sd, self.sigma * self.pc.abs()).max()) < self.tolx:
            out["tolx"] = float(sd.max())
        cond = float((self.D.max() / self.D.min()) ** 2)
        if cond > 1e14:
            out["conditioncov"] = cond
        # A step of 0.1 σ along a principal axis no longer changes the mean (in floating point).
        i = self.run_generation % n
        if bool((self.m == self.m + 0.1 * self.sigma * self.D[i] * self.B[:, i]).all()):
            out["noeffectaxis"] = True
        if bool((self.m == self.m + 0.2 * self.sigma * torch.sqrt(torch.diagonal(self.C))).any()):
            out["noeffectcoord"] = True
        if self.sigma * float(self.D.max()) > 1e4 * self.sigma_run0:
            out["tolupsigma"] = self.sigma * float(self.D.max())
        if self.run_generation >= self.max_gen:
            out["maxiter"] = self.run_generation
        return out

    def _stop_reasons(self) -> dict[str, Any]:
        if self.restarts_done < self.restarts:
            return {}
        return self._run_stop_reasons()
