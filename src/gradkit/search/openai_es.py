"""OpenAI-ES: a Gaussian-smoothed gradient from mirrored samples, stepped with Adam.

Paper: T. Salimans et al., "Evolution Strategies as a Scalable Alternative to Reinforcement Learning" (2017).

Rule: x± = θ ± σ ε_i, ε_i ~ N(0, I), F = centred ranks of f;  g = Σ_k F_k ε_k / (λ σ);  θ ← Adam(θ, g)
(σ fixed; optional L2 weight decay on θ, as in the paper).
"""

from __future__ import annotations

import torch

from .._validate import check_nonneg, check_positive
from .base import MirroredSearcher, TensorLike, centered_ranks

__all__ = ["OpenAIES"]


class OpenAIES(MirroredSearcher):
    """OpenAI evolution strategy (mirrored sampling, centred ranks, Adam), minimisation.

    Args:
        x0, sigma0: initial parameters θ and the fixed noise scale σ (scalar or one per coordinate).
        popsize: even number of candidates; default the even number ≥ ``4 + floor(3 ln d)``.
        lr: Adam learning rate for θ; default ``sigma0 / 2`` (the paper: σ = 0.02, lr = 0.01).
        weight_decay: L2 coefficient added to the gradient estimate.
        betas: Adam's β1, β2.
        other arguments: see :class:`gradkit.search.base.Searcher`.
    """

    paper = "Evolution Strategies as a Scalable Alternative to Reinforcement Learning"
    _state_attrs = ("m", "sigma", "lr", "adam_m", "adam_v", "adam_t")

    def __init__(self, x0: TensorLike, sigma0: TensorLike, *, popsize: int | None = None, lr: float | None = None,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), bounds=None,
                 seed: int | None = None, on_nonfinite: str = "raise", dtype: torch.dtype = torch.float64,
                 device=None):
        super().__init__(x0, sigma0, popsize=popsize, bounds=bounds, seed=seed, on_nonfinite=on_nonfinite,
                         dtype=dtype, device=device)
        self.lr = check_positive("lr", 0.5 * float(self.sigma0.mean()) if lr is None else lr)
        self.weight_decay = check_nonneg("weight_decay", weight_decay)
        self.betas = (check_nonneg("betas[0]", betas[0]), check_nonneg("betas[1]", betas[1]))
        if not (self.betas[0] < 1 and self.betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")

    def gradient(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The search-gradient estimate of f at θ from evaluated candidates (descent direction is −g)."""
        eps = (x - self.m) / self.sigma
        return centered_ranks(f) @ eps / (len(f) * self.sigma)

    def _update(self, x: torch.Tensor, f: torch.Tensor) -> None:
        g = self.gradient(x, f) + self.weight_decay * self.m
        self.m = self.m - self.lr * self._adam(g, self.betas)
