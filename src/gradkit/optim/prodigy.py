"""Prodigy: Adam whose step size d is estimated from the distance travelled from the initial point.

Paper: "Prodigy: An Expeditiously Adaptive Parameter-Free Learner" (Mishchenko & Defazio, 2024), the successor
of "Learning-Rate-Free Learning by D-Adaptation".

    m ← β1·m + d(1−β1)·g,   v ← β2·v + d²(1−β2)·g²,   s ← β3·s + (d/d0)·d·λ·g,   r ← β3·r + (d/d0)·d·λ·⟨g, x_0 − x⟩
    d ← max(d, min(d_max, d_coef·r/‖s‖₁)),   x ← x − d·λ·m/(√v + d·ε)

λ = ``lr`` (keep 1), β3 = √β2 by default. ``safeguard_warmup`` drops λ from s (for warm-up schedules),
``growth_rate`` caps how fast d may grow, ``use_bias_correction`` applies Adam's bias correction to d·λ, and
weight decay is decoupled (x ← x − λ_wd·d·λ·x) unless ``decouple=False`` adds it to the gradient. Names,
defaults and formulas follow the authors' ``prodigyopt`` package (the parity oracle); d, d_max and r are
global and kept in the param groups, so they travel in ``state_dict``.

A step is two passes over memory: the first updates m, v and s and reduces ⟨g, x_0 − x⟩ and ‖s‖₁ in the same
loop; the second moves x once the new d (which enters the ε term) is known. Not supported from the reference:
``slice_p`` (statistics on a strided subset), ``fsdp_in_use``. A group with lr 0 is frozen.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._kernels import Elementwise
from .._validate import check_beta, check_betas, check_nonneg, check_positive, check_range
from ._base import Optimizer, ParamsT
from ._reduce import live_groups, partials, put_abs_sum, put_sum, totals

__all__ = ["Prodigy"]


def _prodigy_stats(p, g, p0, v, s, inner, s_l1, *m, l2, beta1, m_scale, beta2, v_scale, beta3, s_scale,
                   has_m=True, coupled=True):
    if coupled:  # static flags drop zero decay terms (each is a pass over memory under "foreach")
        g = g + p * l2
    put_sum(inner, g * (p0 - p))
    if has_m:
        m[0].mul_(beta1).add_(g * m_scale)
    v.mul_(beta2).add_(g.square() * v_scale)
    s.mul_(beta3).add_(g * s_scale)
    put_abs_sum(s_l1, s)


def _prodigy_update(p, g, v, *m, wd_step, l2, step, d_eps, has_m=True, coupled=True, decoupled=True):
    # Without β1 the step uses the gradient itself (with its coupled decay term), scaled by d·λ·d.
    if not has_m and coupled:
        g = g + p * l2
    u = (m[0] if has_m else g) / (v.sqrt() + d_eps)
    if decoupled:
        p.sub_(p * wd_step)  # not p·(1 − λ_wd·dλ): with d ~ 1e-6 that factor rounds away in float32
    p.sub_(u * step)


PRODIGY_STATS = Elementwise(_prodigy_stats, "prodigy_stats")
PRODIGY_UPDATE = Elementwise(_prodigy_update, "prodigy_update")


class Prodigy(Optimizer):
    """Prodigy (Adam with a D-Adaptation-style estimate of the step size). Leave ``lr`` at 1.

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        lr: λ, a multiplier of the estimated step size d (keep 1). Default 1.0.
        betas: (β1, β2), Adam's moment decay rates. Default (0.9, 0.999).
        beta3: β3, the decay of the statistics s and r (None: √β2). Default None.
        eps: ε in the denominator (scaled by d). Default 1e-8.
        weight_decay: λ_wd (decoupled unless ``decouple=False``). Default 0.
        decouple: decoupled weight decay x ← x − λ_wd·d·λ·x; False adds it to the gradient. Default True.
        use_bias_correction: apply Adam's bias correction to d·λ. Default False.
        safeguard_warmup: leave λ out of s (for warm-up schedules). Default False.
        d0: d_0, the starting value of the estimate d (a lower bound on the distance to the solution). Default 1e-6.
        d_coef: a multiplier of the estimate d. Default 1.0.
        growth_rate: the cap on d's growth per step, d_{k+1} ≤ growth_rate·d_k (inf: no cap). Default inf.
        kernel, on_nonfinite: how the update runs and what a NaN/Inf gradient does, as for
            :class:`~gradkit.optim.Optimizer` (defaults ``"auto"`` and ``"raise"``).
    """

    paper = "Prodigy: An Expeditiously Adaptive Parameter-Free Learner"

    def __init__(self, params: ParamsT, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float | None = None, eps: float = 1e-8, weight_decay: float = 0.0, decouple: bool = True,
                 use_bias_correction: bool = False, safeguard_warmup: bool = False, d0: float = 1e-6,
                 d_coef: float = 1.0, growth_rate: float = float("inf"), *, kernel: str = "auto",
                 on_nonfinite: str = "raise"):
        defaults = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, decouple=decouple,
                        use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, d0=d0,
                        d_coef=d_coef, growth_rate=growth_rate, d=d0, d_max=d0, d_numerator=0.0, k=0)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_betas("betas", group["betas"], 2)
        if group["beta3"] is not None:
            check_beta("beta3", group["beta3"])
        check_positive("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_positive("d0", group["d0"])
        check_positive("d_coef", group["d_coef"])
        check_range("growth_rate", group["growth_rate"], 1.0, allow_inf=True)

    def _step(self, active):
        lr, active = live_groups(self.param_groups, active)
        if not active:
            return
        head = self.param_groups[0]
        beta1, beta2 = head["betas"]
        beta3 = head["beta3"] if head["beta3"] is not None else math.sqrt(beta2)
        d, d_max, k, decouple = head["d"], head["d_max"], head["k"], head["decouple"]
        dlr = d * lr
        if head["use_bias_correction"]:
            dlr *= math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1))
        has_m = beta1 > 0
        keys = ("s", "exp_avg_sq", "exp_avg") if has_m else ("s", "exp_avg_sq")

        inner, s_l1, runs = [], [], []
        for group, params in active:
            states = [self.state[p] for p in params]
            for st, p in zip(states, params):
                for key in keys:
                    if key not in st:
                        st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if "p0" not in st:
                    st["p0"] = p.detach().clone(memory_format=torch.preserve_format)
            grads = [p.grad for p in params]
            ms = [[st["exp_avg"] for st in states]] if has_m else []
            d0 = group["d0"]
            l2 = 0.0 if decouple else group["weight_decay"]
            ip, l1 = partials(params), partials(params)
            stats = PRODIGY_STATS.variant(has_m=has_m, coupled=l2 != 0)
            stats(self.kernel, [params, grads, [st["p0"] for st in states], [st["exp_avg_sq"] for st in states],
                                [st["s"] for st in states], ip, l1, *ms],
                  dict(l2=l2, beta1=beta1, m_scale=d * (1 - beta1), beta2=beta2, v_scale=d * d * (1 - beta2),
                       beta3=beta3, s_scale=(d / d0) * (d if group["safeguard_warmup"] else dlr)))
            inner.append((d / d0) * dlr)
            s_l1 += l1
            runs.append((group, params, grads, states, ms, ip))
        sums = totals(*(r[-1] for r in runs), s_l1)
        delta = sum(scale * x for scale, x in zip(inner, sums[:-1]))
        d_denom = sums[-1]
        if d_denom == 0.0:
            return  # every gradient so far is zero: the reference leaves d and the parameters alone
        d_numerator = beta3 * head["d_numerator"] + delta
        d_hat = head["d_coef"] * d_numerator / d_denom
        if d == self.param_groups[-1]["d0"]:  # the reference compares with the last group's d0
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * head["growth_rate"])
        for group, params, grads, states, ms, _ in runs:
            wd = group["weight_decay"]
            update = PRODIGY_UPDATE.variant(has_m=has_m, coupled=not decouple and wd != 0,
                                            decoupled=decouple and wd != 0)
            update(self.kernel, [params, grads, [st["exp_avg_sq"] for st in states], *ms],
                   dict(wd_step=wd * dlr if decouple else 0.0, l2=0.0 if decouple else wd,
                        step=dlr if has_m else dlr * d, d_eps=d * group["eps"]))
        for group in self.param_groups:
            group.update(d_numerator=d_numerator, d_denom=d_denom, d=d, d_max=d_max, d_hat=d_hat, k=group["k"] + 1)
