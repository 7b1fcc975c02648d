"""D-Adaptation: SGD and Adam whose step size d is a running lower bound on the distance to the solution.

Paper: "Learning-Rate-Free Learning by D-Adaptation" (Defazio & Mishchenko, 2023).

    SGD:   s ← s + d·λ/‖g_0‖·g,   x ← (1−c)·x + c·(x_0 − s),   d ← max(d, 2·Σ_t d_t·λ/‖g_0‖·⟨g_t, s_{t−1}⟩ / ‖s‖)
    Adam:  m ← β1·m + d·λ·(1−β1)·g,  v ← β2·v + (1−β2)·g²,  s ← √β2·s + d·λ·(1−√β2)·g,  x ← x − m/(√v + ε),
           r ← √β2·r + (1−√β2)·d·λ·⟨g, s_{t−1}/(√v_{t−1} + ε)⟩,   d ← max(d, r / ((1−√β2)·‖s‖₁))

λ = ``lr`` (keep 1), c = 1 − ``momentum``; ``growth_rate`` caps how fast d may grow. Names, defaults and formulas
follow the authors' ``dadaptation`` package (the parity oracle), including where weight decay enters: added to
the gradient (both; and for DAdaptSGD *not* to the ‖g_0‖ used in the first step size, as in the reference), or,
for DAdaptAdam with ``decouple=True``, as x ← x − λ_wd·d·λ·x. d and the numerator r are global (the same in every
param group) and kept in the param groups, so they travel in ``state_dict``.

The sums over all parameters are taken inside the update rules (see :mod:`gradkit.optim._reduce`): DAdaptSGD
and DAdaptAdam read the inner product with the *previous* s in one read-only pass, then update every buffer
and reduce the new ‖s‖ in a second pass. Unlike the reference, DAdaptSGD keeps no ``z`` buffer (z = x_0 − s is
formed on the fly), ``weight_decay`` and ``momentum`` are honoured per group (the reference reads them from the
first group), and a group with lr 0 is frozen (the reference still applies decoupled decay to it).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._kernels import Elementwise, sq_norm_total
from .._validate import check_beta, check_betas, check_nonneg, check_positive, check_range
from ._base import Optimizer, ParamsT
from ._reduce import live_groups, partials, put_abs_sum, put_sq_sum, put_sum, totals

__all__ = ["DAdaptAdam", "DAdaptSGD"]


# -- rules ---------------------------------------------------------------------------------------------------

def _dsgd_inner(g, p, s, out, *, wd, decayed=False):
    put_sum(out, (g + p * wd) * s if decayed else g * s)


def _dsgd_update(p, g, s, x0, s_sq, *, wd, dlr, c, decayed=True):
    if decayed:  # static: under "foreach" a zero decay term would still cost two passes
        g = g + p * wd
    s.add_(g * dlr)
    put_sq_sum(s_sq, s)
    p.lerp_(x0 - s, c)


def _dadam_inner(g, p, s, v, out, *, l2, eps, decayed=False):
    if decayed:
        g = g + p * l2
    put_sum(out, g * (s / (v.sqrt() + eps)))


def _dadam_update(p, g, m, v, s, s_l1, *, l2, wd_step, beta1, m_scale, beta2, beta2c, sqrt_beta2, s_scale, eps,
                  coupled=True, decoupled=True):
    if coupled:
        g = g + p * l2
    m.mul_(beta1).add_(g * m_scale)
    v.mul_(beta2).add_(g.square() * beta2c)
    s.mul_(sqrt_beta2).add_(g * s_scale)
    put_abs_sum(s_l1, s)
    if decoupled:
        # x − (λ_wd·dλ)·x rather than x·(1 − λ_wd·dλ): with d ~ 1e-6 the factor would round away in float32.
        p.sub_(p * wd_step)
    p.sub_(m / (v.sqrt() + eps))


DSGD_INNER = Elementwise(_dsgd_inner, "dadapt_sgd_inner")
DSGD_UPDATE = Elementwise(_dsgd_update, "dadapt_sgd_update")
DADAM_INNER = Elementwise(_dadam_inner, "dadapt_adam_inner")
DADAM_UPDATE = Elementwise(_dadam_update, "dadapt_adam_update")


def _check_d(group: dict[str, Any]) -> None:
    check_nonneg("lr", group["lr"])
    check_nonneg("weight_decay", group["weight_decay"])
    check_positive("d0", group["d0"])
    check_range("growth_rate", group["growth_rate"], 1.0, allow_inf=True)


def _init(state: dict[str, Any], p: torch.Tensor, zeros: tuple[str, ...], copies: tuple[str, ...] = ()) -> bool:
    """Create missing buffers; True if the state was fresh."""
    fresh = not state
    for k in zeros:
        if k not in state:
            state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
    for k in copies:
        if k not in state:
            state[k] = p.detach().clone(memory_format=torch.preserve_format)
    return fresh


class DAdaptSGD(Optimizer):
    """SGD with D-Adaptation (dual averaging with momentum). Leave ``lr`` at 1.

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        lr: λ, a multiplier of the adapted step size d (keep 1). Default 1.0.
        momentum: μ, so that the averaging weight is c = 1 − μ. Default 0.
        weight_decay: λ_wd, added to the gradient. Default 0.
        d0: d_0, the initial lower bound on the distance to the solution. Default 1e-6.
        growth_rate: the largest factor by which d may grow in one step (inf: unbounded). Default inf.
        kernel, on_nonfinite: how the update runs and what a NaN/Inf gradient does, as for
            :class:`~gradkit.optim.Optimizer` (defaults ``"auto"`` and ``"raise"``).
    """

    paper = "Learning-Rate-Free Learning by D-Adaptation"

    def __init__(self, params: ParamsT, lr: float = 1.0, momentum: float = 0.0, weight_decay: float = 0.0,
                 d0: float = 1e-6, growth_rate: float = float("inf"), *, kernel: str = "auto",
                 on_nonfinite: str = "raise"):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, d0=d0, growth_rate=growth_rate,
                        d=d0, k=0, numerator_weighted=0.0, g0_norm=0.0)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_d(group)
        check_beta("momentum", group["momentum"])

    def _step(self, active):
        lr, active = live_groups(self.param_groups, active)
        if not active:
            return
        head = self.param_groups[0]
        d, k = head["d"], head["k"]
        if k == 0:
            # ‖g_0‖ of the raw gradients: the reference's weight-decay term here is computed and discarded.
            g0_sq = sq_norm_total([p.grad for _, ps in active for p in ps])
            if g0_sq == 0.0:
                return  # no information yet (the reference divides by zero here); wait for a gradient
            head["g0_norm"] = math.sqrt(g0_sq)
        dlr = d * lr / head["g0_norm"]
        inner, s_sq = [], []
        for group, params in active:
            states = [self.state[p] for p in params]
            fresh = [_init(st, p, ("s",), ("x0",)) for st, p in zip(states, params)]
            grads, ss = [p.grad for p in params], [st["s"] for st in states]
            wd = group["weight_decay"]
            if not all(fresh):  # s = 0 for fresh state: nothing to reduce
                out = partials(params)
                DSGD_INNER.variant(decayed=wd != 0)(self.kernel, [grads, params, ss, out], dict(wd=wd))
                inner += out
            sq = partials(params)
            DSGD_UPDATE.variant(decayed=wd != 0)(self.kernel, [params, grads, ss, [st["x0"] for st in states], sq],
                        dict(wd=wd, dlr=dlr, c=1.0 - group["momentum"]))
            s_sq += sq
        inner_sum, s_sq_sum = totals(inner, s_sq)
        numerator = head["numerator_weighted"] + dlr * inner_sum
        if s_sq_sum == 0.0:
            return
        d_hat = 2.0 * numerator / math.sqrt(s_sq_sum)
        d = max(d, min(d_hat, d * head["growth_rate"]))
        g0_norm = head["g0_norm"]
        for group in self.param_groups:
            group.update(numerator_weighted=numerator, d=d, g0_norm=g0_norm, d_hat=d_hat, k=group["k"] + 1)


class DAdaptAdam(Optimizer):
    """Adam with D-Adaptation. Leave ``lr`` at 1; ``layer_scale`` (per group) scales a group's step.

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        lr: λ, a multiplier of the adapted step size d (keep 1). Default 1.0.
        betas: (β1, β2), Adam's moment decay rates. Default (0.9, 0.999).
        eps: ε in the denominator. Default 1e-8.
        weight_decay: λ_wd (added to the gradient, or decoupled with ``decouple``). Default 0.
        decouple: decoupled weight decay x ← x − λ_wd·d·λ·x instead of adding it to the gradient. Default False.
        use_bias_correction: apply Adam's bias correction to the step. Default False.
        d0: d_0, the initial lower bound on the distance to the solution. Default 1e-6.
        growth_rate: the largest factor by which d may grow in one step (inf: unbounded). Default inf.
        layer_scale: a per-group multiplier of the step. Default 1.0.
        kernel, on_nonfinite: how the update runs and what a NaN/Inf gradient does, as for
            :class:`~gradkit.optim.Optimizer` (defaults ``"auto"`` and ``"raise"``).
    """

    paper = "Learning-Rate-Free Learning by D-Adaptation"

    def __init__(self, params: ParamsT, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decouple: bool = False,
                 use_bias_correction: bool = False, d0: float = 1e-6, growth_rate: float = float("inf"),
                 layer_scale: float = 1.0, *, kernel: str = "auto", on_nonfinite: str = "raise"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple,
                        use_bias_correction=use_bias_correction, d0=d0, growth_rate=growth_rate,
                        layer_scale=layer_scale, d=d0, k=0, numerator_weighted=0.0)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_d(group)
        check_betas("betas", group["betas"], 2)
        check_positive("eps", group["eps"])
        check_nonneg("layer_scale", group["layer_scale"])

    def _step(self, active):
        lr, active = live_groups(self.param_groups, active)
        if not active:
            return
        head = self.param_groups[0]
        beta1, beta2 = head["betas"]
        d, k, decouple = head["d"], head["k"], head["decouple"]
        dlr = d * lr
        if head["use_bias_correction"]:
            dlr *= math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1))
        sqrt_beta2 = math.sqrt(beta2)
        if k == 0 and decouple and any(g["weight_decay"] != 0 for g, _ in active):
            # The reference returns before the decoupled decay when no gradient has been non-zero yet.
            if sq_norm_total([p.grad for _, ps in active for p in ps]) == 0.0:
                return
        inner, s_l1 = [], []
        for group, params in active:
            states = [self.state[p] for p in params]
            fresh = [_init(st, p, ("s", "exp_avg", "exp_avg_sq")) for st, p in zip(states, params)]
            grads, ss, vs = [p.grad for p in params], [st["s"] for st in states], [st["exp_avg_sq"] for st in states]
            wd, r = group["weight_decay"], group["layer_scale"]
            l2 = 0.0 if decouple else wd
            if not all(fresh):
                out = partials(params)
                DADAM_INNER.variant(decayed=l2 != 0)(self.kernel, [grads, params, ss, vs, out],
                                                     dict(l2=l2, eps=group["eps"]))
                inner.append((r, out))
            l1 = partials(params)
            update = DADAM_UPDATE.variant(coupled=l2 != 0, decoupled=decouple and wd != 0)
            update(self.kernel, [params, grads, [st["exp_avg"] for st in states], vs, ss, l1],
                   dict(l2=l2, wd_step=wd * dlr if decouple else 0.0, beta1=beta1,
                        m_scale=r * dlr * (1 - beta1), beta2=beta2, beta2c=1 - beta2, sqrt_beta2=sqrt_beta2,
                        s_scale=dlr * (1 - sqrt_beta2), eps=group["eps"]))
            s_l1.append((r, l1))
        sums = totals(*(out for _, out in inner), *(out for _, out in s_l1))
        numerator_acc = dlr * sum(r * x for (r, _), x in zip(inner, sums[: len(inner)]))
        sk_l1 = sum(r * x for (r, _), x in zip(s_l1, sums[len(inner):]))
        numerator = sqrt_beta2 * head["numerator_weighted"] + (1 - sqrt_beta2) * numerator_acc
        if sk_l1 == 0.0:
            return
        d_hat = numerator / ((1 - sqrt_beta2) * sk_l1)
        d = max(d, min(d_hat, d * head["growth_rate"]))
        for group in self.param_groups:
            group.update(numerator_weighted=numerator, d=d, d_hat=d_hat, k=group["k"] + 1)
