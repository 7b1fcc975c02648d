"""FlowOpt — zeroth-order optimisation of an intermediate latent through the last steps of the flow.

Paper: "FlowOpt: Fast Optimization Through Whole Flow Processes for Training-Free Editing" (Ronai et al., 2025);
rule read in orronai/FlowOpt (``utils/sd3.py``, Eq. 6 there). With f the solver's map over the last ``n_max`` of T
steps (from the latent z at ``t_s = t_{T−n_max}`` to x1) and a target y:

    z ← z − η·(f(z) − y)                               (no model gradient: the flow's Jacobian is taken as I)

and, for a general loss, ``z ← z − η·∇_{x1} L(f(z))`` (the same update with the loss gradient at the output, from
any ``gk.sources`` source — a black-box loss works through SPSA / ES). The latent starts from the inversion of y
(the backward ODE from t = 1 to t_s) unless given.

Step-size condition. Near the solution the error obeys ``e ← (I − η·J)·e`` with J the Jacobian of f; when J has real
positive eigenvalues (affine Gaussian flows: J symmetric positive definite) the iteration converges iff
``0 < η < 2/λ_max(J)`` — the kind of sufficient condition the paper proves. :meth:`FlowOpt.bound` estimates
λ_max(J) by power iteration with finite-difference Jacobian–vector products (flow evaluations only, no autograd),
and ``run`` reports ``eta_bound = 2/λ̂_max`` and the estimated contraction ``ρ(I − η·J)``; ``check="warn"`` (default)
warns, ``"raise"`` refuses a step size above the bound.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from .._validate import check_choice, check_int, check_range
from ..errors import NonFiniteError
from ._grad import GradientEstimator
from ._inputs import FlowMap, InputOptResult
from .base import Guidance
from .sampler import METHODS, Sampler, time_grid

Tensor = torch.Tensor
f64 = torch.float64

__all__ = ["FlowOpt"]


class FlowOpt:
    """Jacobian-free fixed-point iteration on an intermediate latent, with its step-size bound checked.

    Args:
        target: y, the output to reach (``[B, ...]``; the source image's latent for editing / inversion).
        loss: instead of a target, ``loss(x1) -> [B]`` to minimise; its gradient at the output comes from
            ``source`` (default None: ``L = ½‖x1 − y‖²``, whose gradient is ``f(z) − y``).
        eta: η, the step size (default 0.5; the authors' SD3 editing config uses 0.01 on latents).
        iters: iterations (default 8, the authors').
        steps: T, the solver's steps over [0, 1] (default 15, the authors').
        n_max: the number of final steps the latent is optimised through (default 3, the authors').
        method: the ODE solver (default ``"euler"``, the authors').
        guidance: a rule-level guidance in the flow (default none; e.g. ``CFG(3.5)``, their target CFG).
        source: gradient source factory for ``loss`` (default ``Backprop``; ``gk.sources.SPSA`` for a black box).
        check: what to do when η exceeds the estimated bound: ``"warn"`` (default), ``"raise"`` (ValueError before
            any iteration) or ``"off"`` (no estimate, no cost).
        power_iters: power iterations of the bound estimate (default 20; each costs one flow evaluation).
        fd_eps: finite-difference step of the Jacobian–vector products (default 1e-4, relative to the latent's
            RMS, floored at 1e-4 absolute).
        tol: stop when the largest per-sample residual ‖f(z) − y‖ (or loss change) falls below ``tol`` (default 0).
        on_nonfinite: ``"raise"`` (default; z left at the last finite point) or ``"ignore"``.
    """

    paper = "FlowOpt: Fast Optimization Through Whole Flow Processes for Training-Free Editing"

    def __init__(self, target: Tensor | None = None, *, loss: Callable[[Tensor], Tensor] | None = None,
                 eta: float = 0.5, iters: int = 8, steps: int = 15, n_max: int = 3, method: str = "euler",
                 guidance: Guidance | None = None, source: Callable | None = None, check: str = "warn",
                 power_iters: int = 20, fd_eps: float = 1e-4, tol: float = 0.0, on_nonfinite: str = "raise"):
        if (target is None) == (loss is None):
            raise ValueError("give exactly one of target (the output to reach) and loss")
        if loss is not None and not callable(loss):
            raise ValueError(f"loss must be callable x1 -> [B], got {type(loss).__name__}")
        self.target = None if target is None else torch.as_tensor(target)
        self.loss = loss
        self.eta = check_range("eta", eta, 0.0, low_open=True)
        self.iters = check_int("iters", iters, 0)
        self.steps = check_int("steps", steps, 1)
        self.n_max = check_int("n_max", n_max, 1)
        if self.n_max > self.steps:
            raise ValueError(f"n_max must be <= steps ({self.steps}), got {n_max}")
        self.method = check_choice("method", method, tuple(m for m in METHODS if m != "sde"))
        self.guidance = guidance
        self.grad = GradientEstimator(source) if loss is not None else None
        self.check = check_choice("check", check, ("warn", "raise", "off"))
        self.power_iters = check_int("power_iters", power_iters, 1)
        self.fd_eps = check_range("fd_eps", fd_eps, 0.0, low_open=True)
        self.tol = check_range("tol", tol, 0.0)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ("raise", "ignore"))
        grid = time_grid(self.steps)
        self.t_s = float(grid[self.steps - self.n_max])
        self.flow = FlowMap(times=grid[self.steps - self.n_max:], method=self.method, guidance=guidance)

    # ------------------------------------------------------------------ pieces
    def invert(self, model: Any, y: Tensor, cond: Any = None) -> Tensor:
        """The latent at ``t_s`` whose flow ends at ``y``: the backward ODE from t = 1 (the same solver and steps).

        Args:
            model: the flow model.
            y: the output ``[B, ...]``.
            cond: the condition.
        """
        grid = time_grid(self.steps)[self.steps - self.n_max:].flip(0)
        s = Sampler(model, guidance=self.guidance, times=grid, method=self.method)
        out = s.run(y, cond)
        self.flow.nfe += out.nfe
        return out.x

    def residual(self, x1: Tensor, y: Tensor | None) -> Tensor:
        """The update direction at the output: ``x1 − y`` (target) or ``∇L(x1)`` (loss)."""
        if self.loss is None:
            return x1 - y
        g, _ = self.grad(x1, lambda x: -self.loss(x))   # ascent on −L
        return -g

    def bound(self, model: Any, z: Tensor, cond: Any = None, *, seed: int = 0) -> dict[str, Tensor]:
        """Estimate ``λ_max`` of the Jacobian J of f at ``z`` per sample (power iteration, finite differences) and
        the contraction ``ρ(I − η·J)``.

        Args:
            model: the flow model.
            z: latents ``[B, ...]`` at ``t_s``.
            cond: the condition.
            seed: seed of the start vectors (default 0).

        Returns:
            ``{"lambda_max": [B], "eta_bound": [B], "contraction": [B]}`` (float64).
        """
        gen = torch.Generator(device=z.device).manual_seed(seed)
        fz = self.flow(model, z, cond)
        scale = z.flatten(1).pow(2).mean(1).sqrt().clamp_min(1.0).reshape(-1, *([1] * (z.ndim - 1)))
        eps = self.fd_eps * scale

        def jvp(v: Tensor) -> Tensor:
            return (self.flow(model, z + eps * v, cond) - fz) / eps

        def power(op: Callable[[Tensor], Tensor]) -> Tensor:
            v = torch.randn(z.shape, generator=gen, dtype=z.dtype, device=z.device)
            v = v / _norm(v)
            lam = torch.zeros(z.shape[0], dtype=f64)
            for _ in range(self.power_iters):
                w = op(v)
                lam = (w * v).flatten(1).sum(1).to(f64)   # Rayleigh quotient (v normalised)
                v = w / _norm(w).clamp_min(1e-300)
            return lam

        lam = power(jvp)
        rho = power(lambda v: v - self.eta * jvp(v)).abs()
        return {"lambda_max": lam, "eta_bound": 2.0 / lam, "contraction": rho}

    # ------------------------------------------------------------------ the iteration
    def run(self, model: Any, z0: Tensor | None = None, cond: Any = None) -> InputOptResult:
        """Iterate from ``z0`` (default: the inversion of the target) and return the latent and its output.

        Args:
            model: the flow model.
            z0: initial latents at ``t_s`` (``[B, ...]``; required with ``loss``).
            cond: the condition.
        """
        self.flow.nfe, self.flow.evaluations = 0.0, 0
        y = self.target
        if z0 is None:
            if y is None:
                raise ValueError("z0 is required when optimising a loss (there is no target to invert)")
            z0 = self.invert(model, y, cond)
        z = z0.detach().clone()
        info: dict[str, Any] = {"t_s": self.t_s}
        if self.check != "off":
            b = self.bound(model, z, cond)
            info.update(b)
            too_big = self.eta >= b["eta_bound"]
            if bool(too_big.any()):
                msg = (f"eta={self.eta:g} exceeds the estimated step-size bound 2/λ_max = "
                       f"{float(b['eta_bound'].min()):.4g} (contraction ρ(I − ηJ) ≈ {float(b['contraction'].max()):.4g}"
                       "): the iteration may diverge")
                if self.check == "raise":
                    raise ValueError(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
        history: list[float] = []
        residuals: list[Tensor] = []
        it = 0
        for it in range(self.iters + 1):
            fz = self.flow(model, z, cond)
            d = self.residual(fz, y)
            res = _norm(d).flatten().to(f64)
            val = res if self.loss is None else torch.as_tensor(self.loss(fz)).detach().to(f64).reshape(-1)
            if self.on_nonfinite == "raise" and not (bool(torch.isfinite(d).all()) and bool(torch.isfinite(val).all())):
                raise NonFiniteError(f"FlowOpt's residual became non-finite at iteration {it}; z is the last finite "
                                     "latent (eta too large?)")
            history.append(float(val.sum()))
            residuals.append(res)
            if it == self.iters or (self.tol > 0 and float(res.max()) < self.tol):
                break
            z = z - self.eta * d
        info.update({"iterations": it, "residual": torch.stack(residuals)})
        loss = residuals[-1] if self.loss is None else val
        return InputOptResult(x0=z, x1=fz, loss=loss, history=history, nfe=self.flow.nfe,
                              evaluations=self.flow.evaluations, info=info)


def _norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.ndim - 1)))

