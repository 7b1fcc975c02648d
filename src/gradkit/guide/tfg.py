"""TFG — unified training-free reward guidance, with DPS, FreeDoM and MPGD as presets.

Paper: "TFG: Unified Training-Free Guidance for Diffusion Models" (Ye et al., 2024); rule read in
YWolfeee/Training-Free-Guidance ``methods/tfg.py`` and written here in flow form (x̂1 = x + (1−t)·v the data
prediction, f = λ·r a log-reward to increase, h = t′ − t, one Euler/DDIM step t → t′):

    f̃(x̂) = log (1/M) Σ_m exp f(x̂ + σ_t·ε_m)                          smoothing ("implicit dynamics"), σ_t ≥ 0
    ρ-term   v ← v + ρ_t·((1−t)/t)·∇_x f̃(x̂1(x, t))                  gradient *through the model* (variance guidance)
    μ-term   x̂1′ ← x̂1 + μ_t·∇ f̃(x̂1′), N_iter times; x′ += t′·(x̂1′ − x̂1)   gradient on x̂1 only (mean guidance)
    x′ = x + h·v (+ the two terms);  recurrence: renoise x′ back to t (exact forward kernel) and repeat N_recur times

ρ_t, μ_t, σ_t follow a schedule: ``"constant"``, ``"increase"`` (∝ 2t, growing with the signal like TFG's ∝ α_t) or
``"decrease"`` (∝ 2(1 − t)); each has mean 1 over t ∈ [0, 1]. Presets: DPS = ρ only (the TFG repository's DPS also
divides by |f|: ``normalize=True``); FreeDoM = ρ + time-travel recurrence; MPGD = μ only (no model gradient: the
place where a zeroth-order source replaces ∇r of a black-box reward at no extra model evaluation).

Exactness: for Gaussian data N(m, Σ), a linear reward r = aᵀx, λ and ρ = 1 (constant, σ = 0, no normalisation) the
ρ-term equals ``((1−t)/t)·∇ log h_t`` of the exact tilt, so the sampler's endpoint is N(m + λΣa, Σ) (tests prove
it); for mixtures it is an approximation. ((1−t)/t)∇… is evaluated at ``max(t, t_floor)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._validate import check_choice, check_int, check_nonneg, check_range
from ._grad import GradientEstimator
from .base import Composite, Conditional, Guidance, StepContext, as_rule

Tensor = torch.Tensor

__all__ = ["DPS", "MPGD", "TFG", "FreeDoM", "renoise"]

_SCHEDULES = ("constant", "increase", "decrease")


def _sched(kind: str, t: float) -> float:
    return 1.0 if kind == "constant" else (2.0 * t if kind == "increase" else 2.0 * (1.0 - t))


def renoise(x: Tensor, t_from: float, t_to: float, generator: torch.Generator | None) -> Tensor:
    """Exact forward kernel of the path from t_from back to t_to < t_from: ``a·x + c·ξ``, ``a = t_to/t_from``,
    ``c² = (1 − t_to)² − a²(1 − t_from)²``."""
    a = t_to / t_from
    c2 = max((1.0 - t_to) ** 2 - a * a * (1.0 - t_from) ** 2, 0.0)
    xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return a * x + math.sqrt(c2) * xi


class TFG(Composite):
    """Training-free guidance by a (log-)reward, in TFG's unified form (step level; Euler/DDIM steps).

    Args:
        reward: ``reward(x1) -> [B]``, the log-reward of a data point (e.g. a classifier's log-probability, or a
            black-box score); guidance increases ``f = scale·reward``.
        scale: λ (default 1.0).
        rho: ρ, weight of the gradient through the model (default 1.0, TFG's config).
        mu: μ, step size of the gradient ascent on x̂1 (default 1.0, TFG's config).
        sigma: σ, smoothing noise of the reward (default 0.01, TFG's config; 0 disables smoothing).
        n_recur: N_recur, recurrence (time-travel) repeats per step (default 1).
        n_iter: N_iter, ascent steps on x̂1 per step (default 1).
        n_mc: M, Monte-Carlo draws of the smoothing noise (default 4, TFG's ``eps_bsz``).
        rho_schedule, mu_schedule, sigma_schedule: ``"constant"``, ``"increase"`` (∝ 2t) or ``"decrease"``
            (∝ 2(1 − t)) (defaults ``"increase"``, ``"increase"``, ``"decrease"``, TFG's config).
        normalize: divide each sample's gradient by |f̃| (the TFG repository's DPS; default False).
        base: the velocity guided (default :class:`~gradkit.guide.Conditional`; e.g. :class:`CFG`; keep it
            stateless: the ρ-term evaluates it again at the buffer).
        source: gradient source factory for the ρ-term (default ``Backprop``; a zeroth-order source then needs
            model evaluations per direction).
        mean_source: gradient source factory for the μ-term (default ``Backprop``; ``SPSA`` / ``ES`` here need
            reward evaluations only).
        transforms: ``gk.transforms`` applied to both gradients (default none).
        t_floor: the ρ-term is evaluated at ``max(t, t_floor)`` (default 1e-3).
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"`` for the reward gradients.
    """

    paper = "TFG: Unified Training-Free Guidance for Diffusion Models"
    parts = {"base": "base", "rho": "grad_rho", "mu": "grad_mu"}
    methods = ("euler",)

    def __init__(self, reward: Callable[[Tensor], Tensor], *, scale: float = 1.0, rho: float = 1.0, mu: float = 1.0,
                 sigma: float = 0.01, n_recur: int = 1, n_iter: int = 1, n_mc: int = 4,
                 rho_schedule: str = "increase", mu_schedule: str = "increase", sigma_schedule: str = "decrease",
                 normalize: bool = False, base: Guidance | None = None, source: Callable | None = None,
                 mean_source: Callable | None = None, transforms: Sequence[Any] = (), t_floor: float = 1e-3,
                 on_nonfinite: str = "raise"):
        if not callable(reward):
            raise ValueError(f"reward must be callable, got {type(reward).__name__}")
        self.reward = reward
        self.scale = check_range("scale", scale)
        self.rho = check_nonneg("rho", rho)
        self.mu = check_nonneg("mu", mu)
        self.sigma = check_nonneg("sigma", sigma)
        self.n_recur = check_int("n_recur", n_recur, 1)
        self.n_iter = check_int("n_iter", n_iter, 1)
        self.n_mc = check_int("n_mc", n_mc, 1)
        self.rho_schedule = check_choice("rho_schedule", rho_schedule, _SCHEDULES)
        self.mu_schedule = check_choice("mu_schedule", mu_schedule, _SCHEDULES)
        self.sigma_schedule = check_choice("sigma_schedule", sigma_schedule, _SCHEDULES)
        self.normalize = bool(normalize)
        self.base = as_rule(base, Conditional())
        self.t_floor = check_range("t_floor", t_floor, 0.0, 1.0, low_open=True, high_open=True)
        self.grad_rho = GradientEstimator(source, transforms, on_nonfinite)
        self.grad_mu = GradientEstimator(mean_source, transforms, on_nonfinite)

    def smoothed(self, x1: Tensor, sigma: float, noise: Tensor | None) -> Tensor:
        """``f̃(x̂1)``: ``scale·reward``, log-mean-exp over the smoothing draws when σ > 0."""
        if sigma == 0.0 or noise is None:
            return self.scale * self.reward(x1)
        vals = torch.stack([self.scale * self.reward(x1 + sigma * e) for e in noise])
        return torch.logsumexp(vals, dim=0) - math.log(noise.shape[0])

    def _noise(self, ctx: StepContext, sigma: float) -> Tensor | None:
        if sigma == 0.0:
            return None
        return torch.randn((self.n_mc, *ctx.x.shape), generator=ctx.generator, dtype=ctx.x.dtype,
                           device=ctx.x.device)

    def _normalise(self, g: Tensor, vals: Tensor) -> Tensor:
        if not self.normalize:
            return g
        return g / vals.abs().clamp_min(1e-12).reshape(-1, *([1] * (g.ndim - 1)))

    def step(self, ctx: StepContext) -> Tensor:
        x, t, tn, h = ctx.x, ctx.t, ctx.t_next, ctx.t_next - ctx.t
        rho_t = self.rho * _sched(self.rho_schedule, t)
        mu_t = self.mu * _sched(self.mu_schedule, t)
        sig_t = self.sigma * _sched(self.sigma_schedule, t)
        x_next = x
        for r in range(self.n_recur):
            cx = ctx if r == 0 else ctx.at(x)
            v = self.base.velocity(cx)
            x_next = x + h * v
            if rho_t != 0.0 and t < 1.0:
                tg = max(t, self.t_floor)
                noise = self._noise(ctx, sig_t)

                def f(xb: Tensor, tg=tg, noise=noise) -> Tensor:
                    vb = self.base.velocity(cx.at(xb, tg))
                    return self.smoothed(cx.x1(vb, xb, tg), sig_t, noise)

                g, vals = self.grad_rho(x, f)
                x_next = x_next + (h * rho_t * (1.0 - tg) / tg) * self._normalise(g, vals)
            if mu_t != 0.0:
                x1 = cx.x1(v)
                x1p = x1
                noise = self._noise(ctx, sig_t)
                for _ in range(self.n_iter):
                    g, vals = self.grad_mu(x1p, lambda xb, noise=noise: self.smoothed(xb, sig_t, noise))
                    x1p = x1p + mu_t * self._normalise(g, vals)
                x_next = x_next + tn * (x1p - x1)
            if r < self.n_recur - 1:
                x = renoise(x_next, tn, t, ctx.generator)
        return x_next



class DPS(TFG):
    """DPS: the gradient of the reward of x̂1 through the model (TFG with ρ only).

    Paper: "Diffusion Posterior Sampling for General Noisy Inverse Problems" (Chung et al., 2023).

    Args:
        reward: ``reward(x1) -> [B]`` log-reward (for an inverse problem ``−‖y − A(x1)‖²/(2σ_y²)``).
        scale: λ, equivalently DPS's step ζ (default 1.0; exact for Gaussian data and a linear reward).
        normalize: divide by |f| per sample (default False; the TFG repository's DPS does; DPS itself divides by
            the residual norm ‖y − A(x̂)‖, which for the squared-residual reward above is ``normalize=True`` up to
            a factor √|f|).
        base, source, transforms, t_floor, on_nonfinite: see :class:`TFG`.
    """

    paper = "Diffusion Posterior Sampling for General Noisy Inverse Problems"

    def __init__(self, reward: Callable[[Tensor], Tensor], scale: float = 1.0, *, normalize: bool = False,
                 base: Guidance | None = None, source: Callable | None = None, transforms: Sequence[Any] = (),
                 t_floor: float = 1e-3, on_nonfinite: str = "raise"):
        super().__init__(reward, scale=scale, rho=1.0, mu=0.0, sigma=0.0, n_recur=1, rho_schedule="constant",
                         normalize=normalize, base=base, source=source, transforms=transforms, t_floor=t_floor,
                         on_nonfinite=on_nonfinite)


class FreeDoM(TFG):
    """FreeDoM: energy guidance through the model with time-travel (TFG with ρ and recurrence).

    Paper: "FreeDoM: Training-Free Energy-Guided Conditional Diffusion Model" (Yu et al., 2023).

    Args:
        reward: ``reward(x1) -> [B]``, the negative energy.
        scale: λ (default 1.0).
        n_recur: time-travel repeats per step (default 1; the paper repeats in a middle range of steps, task
            dependent).
        base, source, transforms, t_floor, on_nonfinite: see :class:`TFG`.
    """

    paper = "FreeDoM: Training-Free Energy-Guided Conditional Diffusion Model"

    def __init__(self, reward: Callable[[Tensor], Tensor], scale: float = 1.0, *, n_recur: int = 1,
                 base: Guidance | None = None, source: Callable | None = None, transforms: Sequence[Any] = (),
                 t_floor: float = 1e-3, on_nonfinite: str = "raise"):
        super().__init__(reward, scale=scale, rho=1.0, mu=0.0, sigma=0.0, n_recur=n_recur, rho_schedule="constant",
                         base=base, source=source, transforms=transforms, t_floor=t_floor, on_nonfinite=on_nonfinite)


class MPGD(TFG):
    """MPGD: gradient ascent on the data prediction only — no model gradient (TFG with μ only).

    Paper: "Manifold Preserving Guided Diffusion" (He et al., 2024). (The paper's optional autoencoder projection
    is not included.)

    Args:
        reward: ``reward(x1) -> [B]`` log-reward.
        scale: λ (default 1.0); the ascent step on x̂1 is ``λ·∇reward``.
        n_iter: ascent steps per sampler step (default 1).
        base: see :class:`TFG`.
        source: gradient source factory on x̂1 (default ``Backprop``; ``SPSA`` / ``ES`` for a black-box reward,
            reward evaluations only).
        transforms, on_nonfinite: see :class:`TFG`.
    """

    paper = "Manifold Preserving Guided Diffusion"

    def __init__(self, reward: Callable[[Tensor], Tensor], scale: float = 1.0, *, n_iter: int = 1,
                 base: Guidance | None = None, source: Callable | None = None, transforms: Sequence[Any] = (),
                 on_nonfinite: str = "raise"):
        super().__init__(reward, scale=scale, rho=0.0, mu=1.0, sigma=0.0, n_iter=n_iter, mu_schedule="constant",
                         base=base, mean_source=source, transforms=transforms, on_nonfinite=on_nonfinite)
