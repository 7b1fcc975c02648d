"""DoG and L-DoG (Distance over Gradients), and the polynomial-decay averager the authors pair them with.

Paper: "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size Schedule" (Ivgi, Hinder & Carmon, 2023).

    η_t = c · r̄_t / √(Σ_{i≤t} ‖g_i‖² + ε),   r̄_t = max(r_ε, max_{i≤t} ‖x_i − x_0‖),   x_{t+1} = x_t − η_t·g_t

with r_ε = ``reps_rel``·(1 + ‖x_0‖) and c = ``lr`` (1; the authors advise against changing it). ``DoG`` treats all
parameters of a group as one vector; ``LDoG`` applies the same formula to each tensor separately.
``weight_decay`` adds λ·x to the gradient (before the norms are taken); ``init_eta`` overrides the first step size.
Names, defaults and formulas follow the authors' ``dog-optimizer`` package (the parity oracle).

A step is two passes over memory: one reads x, g and x_0 to reduce ‖x − x_0‖² and ‖g + λx‖² (per tensor, then
summed), the other moves x. The paper stresses that DoG needs iterate averaging for its best results:
:class:`PolynomialDecayAverager` keeps the average of Shamir & Zhang (2013) beside the model.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from .._kernels import Elementwise, sq_norm_total, sq_norms
from .._validate import check_nonneg, check_positive
from ._base import Optimizer, ParamsT
from ._reduce import partials, per_tensor, put_sq_sum, totals

__all__ = ["DoG", "LDoG", "PolynomialDecayAverager"]


def _dog_stats(p, g, x0, dist_sq, grad_sq, *, wd, decayed=True):
    put_sq_sum(dist_sq, p - x0)
    put_sq_sum(grad_sq, g + p * wd if decayed else g)


def _dog_update(p, g, *eta, wd, step=0.0, per_tensor=False, decayed=True):
    # DoG moves every tensor by one global η (a scalar); L-DoG passes one 0-d η per tensor.
    if decayed:
        g = g + p * wd
    p.sub_(g * (eta[0] if per_tensor else step))


DOG_STATS = Elementwise(_dog_stats, "dog_stats")
DOG_UPDATE = Elementwise(_dog_update, "dog_update")


class DoG(Optimizer):
    """DoG: SGD whose step is the largest distance travelled over the root of the summed squared gradients.

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        reps_rel: r_ε relative to the initial point: r_ε = reps_rel·(1 + ‖x_0‖), the first 'distance'. Default 1e-6.
        lr: c, a multiplier of the DoG step size (keep 1). Default 1.0.
        weight_decay: λ, adds λ·x to the gradient before the norms are taken. Default 0.
        eps: ε under the square root of the summed squared gradient norms. Default 1e-8.
        init_eta: the first step size η_0, overriding r_ε (None: use reps_rel). Default None.
        kernel, on_nonfinite: how the update runs and what a NaN/Inf gradient does, as for
            :class:`~gradkit.optim.Optimizer` (defaults ``"auto"`` and ``"raise"``).
    """

    paper = "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size Schedule"

    def __init__(self, params: ParamsT, reps_rel: float = 1e-6, lr: float = 1.0, weight_decay: float = 0.0,
                 eps: float = 1e-8, init_eta: float | None = None, *, kernel: str = "auto",
                 on_nonfinite: str = "raise"):
        if init_eta is not None:
            # As in the reference: the first step is init_eta, and r̄ starts from the first distance travelled
            # (a group may still set its own reps_rel).
            reps_rel = 0.0
        defaults = dict(reps_rel=reps_rel, lr=lr, weight_decay=weight_decay, eps=eps, init_eta=init_eta)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        if group["init_eta"] is None:
            check_positive("reps_rel", group["reps_rel"])
        else:
            check_nonneg("reps_rel", group["reps_rel"])
            check_positive("init_eta", group["init_eta"])
        check_nonneg("lr", group["lr"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_positive("eps", group["eps"])

    def _r_eps(self, group: dict[str, Any], norm_x0: float) -> float:
        return group["reps_rel"] * (1.0 + norm_x0)

    def _stats(self, group, params):
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if "x0" not in st:
                # A tensor gets x_0 on its first gradient: it cannot have moved before, so this is its start.
                st["x0"] = p.detach().clone(memory_format=torch.preserve_format)
        dist_sq, grad_sq = partials(params), partials(params)
        stats = DOG_STATS.variant(decayed=group["weight_decay"] != 0)
        stats(self.kernel, [params, [p.grad for p in params], [s["x0"] for s in states], dist_sq, grad_sq],
              dict(wd=group["weight_decay"]))
        return states, dist_sq, grad_sq

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        _, dist_sq, grad_sq = self._stats(group, params)
        d2, g2 = totals(dist_sq, grad_sq)
        if "rbar" not in group:
            # ‖x_0‖ of the whole group, as the reference takes it (tensors without a gradient included).
            x0_sq = sq_norm_total([p.detach() for p in group["params"]])
            group["rbar"] = self._r_eps(group, math.sqrt(x0_sq))
            group["G"] = g2 + group["eps"]
            first = True
        else:
            group["rbar"] = max(group["rbar"], math.sqrt(d2))
            group["G"] += g2
            first = False
        eta = group["lr"] * group["rbar"] / math.sqrt(group["G"])
        if first and group["init_eta"] is not None:
            eta = group["init_eta"]
        group["eta"] = eta
        DOG_UPDATE.variant(decayed=group["weight_decay"] != 0)(
            self.kernel, [params, [p.grad for p in params]], dict(wd=group["weight_decay"], step=eta))


class LDoG(DoG):
    """Layer-wise DoG: the DoG step size computed for each parameter tensor on its own.

    Args:
        params, reps_rel, lr, weight_decay, eps, init_eta, kernel, on_nonfinite: as for :class:`DoG`, with the
            distances and gradient norms taken per tensor.
    """

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        states, dist_sq, grad_sq = self._stats(group, params)
        new = [i for i, st in enumerate(states) if "rbar" not in st]
        x0_sq = sq_norms([params[i].detach() for i in new])
        values = per_tensor(dist_sq + grad_sq + x0_sq)  # one synchronisation for every tensor's statistics
        n = len(params)
        d2s, g2s, x0_norms = values[:n], values[n:2 * n], dict(zip(new, (math.sqrt(v) for v in values[2 * n:])))
        etas = []
        for i, (p, st) in enumerate(zip(params, states)):
            if i in x0_norms:
                st["rbar"] = self._r_eps(group, x0_norms[i])
                st["G"] = g2s[i] + group["eps"]
                eta = group["init_eta"]
            else:
                st["rbar"] = max(st["rbar"], math.sqrt(d2s[i]))
                st["G"] += g2s[i]
                eta = None
            st["eta"] = eta if eta is not None else group["lr"] * st["rbar"] / math.sqrt(st["G"])
            etas.append(torch.tensor(st["eta"], dtype=p.dtype, device=p.device))
        update = DOG_UPDATE.variant(per_tensor=True, decayed=group["weight_decay"] != 0)
        update(self.kernel, [params, [p.grad for p in params], etas], dict(wd=group["weight_decay"]))


class PolynomialDecayAverager:
    """Polynomial-decay averaging of a model's weights (Shamir & Zhang, 2013), as recommended for DoG.

        x̄_t = (1 − w_t)·x̄_{t−1} + w_t·x_t,   w_t = (1 + γ)/(t + γ)

    Call :meth:`step` after each optimizer step; evaluate :attr:`averaged_model`. Integer buffers (e.g. batch-norm
    counters) are copied, not averaged. ``state_dict()`` holds ``t`` and the averaged weights.

    Args:
        model: the module whose weights are averaged (a deep copy holds the average).
        gamma: γ in the averaging weight w_t = (1 + γ)/(t + γ); 0 is the uniform average. Default 8.0.
    """

    paper = "Stochastic Gradient Descent for Non-smooth Optimization: Convergence Results and Optimal Averaging Schemes"

    def __init__(self, model: torch.nn.Module, gamma: float = 8.0):
        self.gamma = check_nonneg("gamma", gamma)
        self.model = model
        self.av_model = copy.deepcopy(model)
        for p in self.av_model.parameters():
            p.requires_grad_(False)
        self.t = 1

    @property
    def averaged_model(self) -> torch.nn.Module:
        return self.av_model

    @property
    def base_model(self) -> torch.nn.Module:
        return self.model

    @torch.no_grad()
    def step(self) -> None:
        w = (self.gamma + 1.0) / (self.gamma + self.t)
        src, dst = self.model.state_dict(), self.av_model.state_dict()
        first = next(iter(src.values()), None)
        if first is not None and dst[next(iter(src))].device != first.device:
            self.av_model.to(first.device)  # the model moved (e.g. .cuda()) after the averager was built
            dst = self.av_model.state_dict()
        runs: dict[tuple, tuple[list, list]] = {}
        for k, x in src.items():
            if x.is_floating_point():
                avgs, xs = runs.setdefault((x.device, x.dtype), ([], []))
                avgs.append(dst[k])
                xs.append(x)
            else:
                dst[k].copy_(x)  # counters such as BatchNorm's num_batches_tracked
        for avgs, xs in runs.values():
            torch._foreach_lerp_(avgs, xs, w)
        self.t += 1

    def reset(self) -> None:
        """Restart the average: the next :meth:`step` copies the model (w_1 = 1)."""
        self.t = 1

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "gamma": self.gamma, "av_model": self.av_model.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.t = int(state_dict["t"])
        self.gamma = float(state_dict.get("gamma", self.gamma))
        self.av_model.load_state_dict(state_dict["av_model"])
