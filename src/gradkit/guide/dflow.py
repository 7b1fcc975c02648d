"""D-Flow — optimise the source noise by differentiating through the whole (fixed-step) flow.

Paper: "D-Flow: Differentiating through Flows for Controlled Generation" (Ben-Hamu et al., 2024). With Φ the
sampler's map from the noise x0 (t = 0) to the sample x1 (t = 1):

    x0* = argmin_{x0}  L(Φ(x0)) + α·R(x0)

solved by L-BFGS (the paper's choice) or any ``torch.optim`` / ``gk.optim`` optimizer, with the gradient by
backpropagation through every solver step, or by the adjoint ODE (``adjoint=True``: torchdiffeq's
``odeint_adjoint``, memory independent of the number of steps). The paper's regulariser keeps x0 on the Gaussian
shell where the model's noise lives: ``R = −log χ_d(‖x0‖) = ½‖x0‖² − (d−1)·log‖x0‖`` (minimised at
‖x0‖ = √(d−1)); ``"gaussian"`` is ``½‖x0‖²``.

Exactness (tests): for Gaussian data N(m, Σ) the exact flow is ``Φ(x0) = m + Σ^{1/2}x0``, so
``L = ½‖Φ(x0) − y‖²`` has ``x0* = Σ^{−1/2}(y − m)``; a fixed-step solver gives an affine ``Φ_h(x0) = A_h x0 + b_h``
and ``x0* = A_h⁻¹(y − b_h)``; for a mixture ``x0* = Φ⁻¹(y)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._validate import check_choice, check_int, check_nonneg, check_range
from ..errors import NonFiniteError
from ._inputs import FlowMap, InputOptResult, check_objective, per_sample
from .base import Conditional, Guidance, StepContext, _Counter
from .model import as_flow_model

Tensor = torch.Tensor
f64 = torch.float64

__all__ = ["DFlow", "chi_regularizer"]

_ADJOINT = {"euler": "euler", "midpoint": "midpoint", "rk4": "rk4"}


def chi_regularizer(x0: Tensor) -> Tensor:
    """``[B]`` ``½‖x0‖² − (d−1)·log‖x0‖``: the negative log-density of ‖x0‖ under χ_d (up to a constant).

    Args:
        x0: ``[B, ...]`` noises (d = the number of elements of one sample).
    """
    d = x0[0].numel()
    r2 = x0.flatten(1).pow(2).sum(1)
    return 0.5 * r2 - 0.5 * (d - 1) * torch.log(r2)


class DFlow:
    """Source-noise optimisation through the differentiable flow.

    Args:
        loss: ``loss(x1) -> [B]`` to minimise (to maximise a reward pass ``lambda x: -reward(x)``); must be
            differentiable (for a black box use :class:`NoiseSearch` with a zeroth-order source).
        steps: solver steps of Φ (default 20).
        method: ``"euler"``, ``"midpoint"`` (default), ``"heun"`` or ``"rk4"`` (``"euler"``, ``"midpoint"``,
            ``"rk4"`` with ``adjoint=True``; torchdiffeq's rk4 is the 3/8 rule).
        guidance: a rule-level guidance inside Φ (default none, e.g. ``CFG(w)``).
        optimizer: ``"lbfgs"`` (default: ``torch.optim.LBFGS`` with strong-Wolfe line search, the paper's choice)
            or a factory ``params -> torch.optim.Optimizer`` (e.g. ``lambda p: gk.optim.AdamW(p, lr=0.05)``).
        lr: L-BFGS step length (default 1.0).
        iters: optimizer steps (default 20; one L-BFGS step may evaluate Φ several times in its line search).
        reg: ``None`` (default), ``"chi"`` (the χ_d shell, the paper's) or ``"gaussian"`` (½‖x0‖²).
        reg_weight: α (default 1.0).
        adjoint: gradient by the adjoint ODE (torchdiffeq ``odeint_adjoint``; default False: backpropagation
            through the steps).
        tol: stop when the objective changes by less than ``tol`` (relative) between steps (default 0: run all
            ``iters``).
        on_nonfinite: ``"raise"`` (default: :class:`gradkit.NonFiniteError`, x0 left at the last finite point) or
            ``"ignore"``.
        flow: a differentiable map ``x0 -> x1`` used instead of the solver (e.g. a closed-form flow map, or a
            one-step distilled model; default None: the solver on ``model``). Its calls count no NFE.
    """

    paper = "D-Flow: Differentiating through Flows for Controlled Generation"

    def __init__(self, loss: Callable[[Tensor], Tensor], *, steps: int = 20, method: str = "midpoint",
                 guidance: Guidance | None = None, optimizer: str | Callable[[list[Tensor]], Any] = "lbfgs",
                 lr: float = 1.0, iters: int = 20, reg: str | None = None, reg_weight: float = 1.0,
                 adjoint: bool = False, tol: float = 0.0, on_nonfinite: str = "raise",
                 flow: Callable[[Tensor], Tensor] | None = None):
        self.loss = check_objective("loss", loss)
        self.flow = FlowMap(steps=steps, method=method, guidance=guidance)
        if not (optimizer == "lbfgs" or callable(optimizer)):
            raise ValueError(f"optimizer must be 'lbfgs' or a factory params -> Optimizer, got {optimizer!r}")
        self.optimizer = optimizer
        self.lr = check_range("lr", lr, 0.0, low_open=True)
        self.iters = check_int("iters", iters, 0)
        self.reg = check_choice("reg", reg, (None, "chi", "gaussian"))
        self.reg_weight = check_nonneg("reg_weight", reg_weight)
        self.adjoint = bool(adjoint)
        if self.adjoint and method not in _ADJOINT:
            raise ValueError(f"method={method!r} has no torchdiffeq counterpart for adjoint=True; use one of "
                             f"{tuple(_ADJOINT)}")
        self.tol = check_nonneg("tol", tol)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ("raise", "ignore"))
        if flow is not None and not callable(flow):
            raise ValueError(f"flow must be None or a callable x0 -> x1, got {type(flow).__name__}")
        self.flow_fn = flow

    # ------------------------------------------------------------------ Φ and the objective
    def objective(self, x0: Tensor, x1: Tensor) -> Tensor:
        """``[B]`` ``L(x1) + α·R(x0)``.

        Args:
            x0: the inputs.
            x1: Φ(x0).
        """
        val = per_sample(self.loss(x1), x0.shape[0])
        if self.reg == "chi":
            val = val + self.reg_weight * chi_regularizer(x0)
        elif self.reg == "gaussian":
            val = val + self.reg_weight * 0.5 * x0.flatten(1).pow(2).sum(1)
        return val

    def forward(self, model: Any, x0: Tensor, cond: Any = None) -> Tensor:
        """Φ(x0), differentiable (backprop through the steps, or through the adjoint ODE).

        Args:
            model: the flow model.
            x0: the noises ``[B, ...]``.
            cond: the condition.
        """
        if self.flow_fn is not None:
            self.flow.evaluations += 1
            return self.flow_fn(x0)
        if not self.adjoint:
            return self.flow(model, x0, cond, grad=True)
        return self._adjoint_forward(model, x0, cond)

    def _adjoint_forward(self, model: Any, x0: Tensor, cond: Any) -> Tensor:
        try:
            from torchdiffeq import odeint_adjoint
        except ImportError as exc:  # pragma: no cover - torchdiffeq is a test/optional extra
            raise ImportError("adjoint=True needs torchdiffeq (pip install torchdiffeq)") from exc
        from .sampler import time_grid

        fm = as_flow_model(model)
        rule = self.flow.guidance if self.flow.guidance is not None else Conditional()
        counter = _Counter(x0.shape[0])
        times = time_grid(self.flow.steps).to(x0.dtype)

        def func(t: Tensor, x: Tensor) -> Tensor:
            tt = float(t.detach())
            ctx = StepContext(x=x, t=tt, t_next=tt, t_step=tt, step=0, num_steps=self.flow.steps,
                              stage=0, cond=cond, model=fm, counter=counter, generator=None, method=self.flow.method)
            return rule.velocity(ctx)

        out = odeint_adjoint(func, x0, times, method=_ADJOINT[self.flow.method], adjoint_params=())
        self.flow.nfe += counter.nfe
        self.flow.evaluations += 1
        return out[-1]

    # ------------------------------------------------------------------ the optimisation
    def run(self, model: Any, x0: Tensor, cond: Any = None) -> InputOptResult:
        """Optimise from the noises ``x0`` ``[B, ...]`` (the samples are independent: their objectives are summed).

        Args:
            model: the flow model.
            x0: initial noises (not modified).
            cond: the condition.
        """
        self.flow.nfe, self.flow.evaluations = 0.0, 0
        z = x0.detach().clone().requires_grad_(True)
        if self.optimizer == "lbfgs":
            opt = torch.optim.LBFGS([z], lr=self.lr, max_iter=1, line_search_fn="strong_wolfe",
                                    tolerance_grad=0.0, tolerance_change=0.0, history_size=20)
        else:
            opt = self.optimizer([z])
        backward = 0
        last_finite = z.detach().clone()
        seen: list[float] = []

        def closure() -> Tensor:
            nonlocal backward
            opt.zero_grad(set_to_none=True)
            val = self.objective(z, self.forward(model, z, cond)).sum()
            if self.on_nonfinite == "raise" and not bool(torch.isfinite(val)):
                raise NonFiniteError("the D-Flow objective is non-finite; x0 was left at the last finite point")
            val.backward()
            backward += 1
            seen.append(float(val.detach()))
            return val

        history: list[float] = []   # the objective at the start of every step (the closure's first value)
        it = 0
        try:
            for k in range(1, self.iters + 1):
                it = k
                seen.clear()
                last_finite.copy_(z.detach())
                opt.step(closure)
                history.append(seen[0])
                if self.tol > 0 and len(history) > 1 and \
                        abs(history[-2] - history[-1]) <= self.tol * max(abs(history[-1]), 1e-300):
                    break
        except NonFiniteError:
            with torch.no_grad():
                z.copy_(last_finite)
            raise
        with torch.no_grad():
            x0_opt = z.detach().clone()
            x1 = self.flow_fn(x0_opt) if self.flow_fn is not None else self.flow(model, x0_opt, cond)
            loss = self.objective(x0_opt, x1).to(f64)
        history.append(float(loss.sum()))
        return InputOptResult(x0=x0_opt, x1=x1, loss=loss, history=history, nfe=self.flow.nfe,
                              evaluations=self.flow.evaluations, info={"iterations": it, "backward": backward,
                                                                       "improved": _improved(history)})


def _improved(history: Sequence[float]) -> bool:
    return len(history) > 1 and math.isfinite(history[-1]) and history[-1] <= history[0]
