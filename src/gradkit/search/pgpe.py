"""Policy Gradients with Parameter-based Exploration (PGPE) with symmetric sampling.

Paper: F. Sehnke et al., "Parameter-exploring policy gradients" (Neural Networks, 2010).

Rule (minimising f, r = centred-rank utility of −f): pairs x± = μ ± ε, ε ~ N(0, diag σ²);
∇μ = mean_i ε_i (r⁺_i − r⁻_i)/2,  ∇σ = mean_i ((r⁺_i + r⁻_i)/2 − b)(ε_i² − σ²)/σ;
μ ← μ + η_μ·step(∇μ) (plain or Adam), σ ← σ + η_σ ∇σ with the relative change of σ clipped.
"""

from __future__ import annotations

from typing import Any

import torch

from .._validate import check_choice, check_nonneg, check_positive
from .base import MirroredSearcher, TensorLike, centered_ranks

__all__ = ["PGPE"]


class PGPE(MirroredSearcher):
    """PGPE with symmetric (antithetic) sampling and centred-rank fitness shaping, minimisation.

    Args:
        x0, sigma0: initial mean and exploration standard deviation (scalar or one per coordinate).
        popsize: an even number of candidates (pairs μ ± ε); default the even number ≥ ``4 + floor(3 ln d)``.
        lr_mean: η_μ. With ``optimizer="sgd"`` the step is ``η_μ ∇μ`` (default η_μ = 1; ∇μ is in units of x);
            with ``"adam"`` each coordinate moves about ``η_μ`` per generation (default ``0.2 · mean(sigma0)``).
        lr_sigma: η_σ (default 0.1).
        optimizer: ``"adam"`` (default) or ``"sgd"`` (the paper's plain gradient step) for the mean.
        max_sigma_change: bound on the relative change of σ per generation (default 0.2, as EvoTorch).
        other arguments: see :class:`gradkit.search.base.Searcher`.
    """

    paper = "Parameter-exploring policy gradients"
    _state_attrs = ("m", "sigma", "adam_m", "adam_v", "adam_t", "lr_mean")

    def __init__(self, x0: TensorLike, sigma0: TensorLike, *, popsize: int | None = None,
                 lr_mean: float | None = None, lr_sigma: float = 0.1, optimizer: str = "adam",
                 max_sigma_change: float = 0.2, tolx: float = 1e-12, bounds=None, seed: int | None = None,
                 on_nonfinite: str = "raise", dtype: torch.dtype = torch.float64, device=None):
        super().__init__(x0, sigma0, popsize=popsize, bounds=bounds, seed=seed, on_nonfinite=on_nonfinite,
                         dtype=dtype, device=device)
        self.optimizer = check_choice("optimizer", optimizer, ("adam", "sgd"))
        default_lr = 0.2 * float(self.sigma0.mean()) if self.optimizer == "adam" else 1.0
        self.lr_mean = check_positive("lr_mean", default_lr if lr_mean is None else lr_mean)
        self.lr_sigma = check_nonneg("lr_sigma", lr_sigma)
        self.max_sigma_change = check_positive("max_sigma_change", max_sigma_change)
        self.tolx = check_nonneg("tolx", tolx)

    def _update(self, x: torch.Tensor, f: torch.Tensor) -> None:
        r = -centered_ranks(f)  # reward: best (lowest f) gets +0.5
        rp, rm = r[0::2], r[1::2]
        # ε from the evaluated pair (its half-difference stays exact under clipping to the bounds).
        eps = (x[0::2] - x[1::2]) / 2
        grad_m = ((rp - rm)[:, None] / 2 * eps).mean(0)
        baseline = r.mean()
        grad_s = ((((rp + rm) / 2 - baseline)[:, None]) * (eps * eps - self.sigma ** 2) / self.sigma).mean(0)
        if self.optimizer == "adam":
            self.m = self.m + self.lr_mean * self._adam(grad_m)
        else:
            self.m = self.m + self.lr_mean * grad_m
        # Bounded relative change keeps σ positive and stops one lucky generation from collapsing it.
        delta = (self.lr_sigma * grad_s).clamp(-self.max_sigma_change * self.sigma,
                                               self.max_sigma_change * self.sigma)
        self.sigma = self.sigma + delta

    def _stop_reasons(self) -> dict[str, Any]:
        s = float(self.sigma.max())
        return {"tolx": s} if self.generation > 0 and s < self.tolx else {}
