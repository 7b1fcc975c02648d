"""AdaHessian: Adam whose second moment is the square of a Hutchinson estimate of the Hessian diagonal.

Paper: "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning" (Yao et al., AAAI 2021).

    D = |z ⊙ (H·z)|, z Rademacher (spatially averaged over each conv kernel),   m ← β1·m + (1−β1)·g,
    v ← β2·v + (1−β2)·D²,   p ← p − lr·( m/(1−β1^t) / ((√v)^k / (1−β2^t)^{k/2} + ε) + λ·p ),   k = hessian_power

H·z is one extra backward pass through the gradient's graph, so the gradients must carry one: call
``loss.backward(create_graph=True)``, or use ``gk.Pipeline(gk.sources.Backprop(model, create_graph=True),
optimizer=AdaHessian(...))``. Without a graph the step raises a ``RuntimeError`` saying so. A parameter
whose gradient has no graph while others have one has a constant gradient, i.e. zero curvature, and gets
D = 0. After the step the gradients are detached, which frees the graph.

Probes z are drawn from the optimizer's own generator (``seed=``, saved in ``state_dict``), one Rademacher
tensor per parameter in param-group order, so runs are reproducible and unaffected by other users of the
global RNG. Names, defaults and the update follow ``torch-optimizer``'s ``Adahessian`` (the parity oracle:
given the same probes, the two agree), including its weight decay ``lr·λ·p`` added to the step. Kernels with
≥ 3 dimensions average |H·z ⊙ z| over every dimension after the first two (the reference handles 4-D only).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .._kernels import Elementwise
from .._validate import check_betas, check_int, check_nonneg, check_positive, check_range
from ._base import Optimizer, ParamsT

__all__ = ["AdaHessian"]


def _adahessian(p, g, d, m, v, *, beta1c, beta2, beta2c, bc1, bc2_k, k, eps, lr, wd):
    m.lerp_(g, beta1c)
    v.mul_(beta2).add_(d.square().mul_(beta2c))
    denom = (v.sqrt() ** k).div_(bc2_k).add_(eps)
    p.sub_((m / bc1 / denom).add_(p * wd).mul_(lr))


ADAHESSIAN = Elementwise(_adahessian, "adahessian")


class AdaHessian(Optimizer):
    """AdaHessian with seeded Hutchinson probes; needs gradients created with ``create_graph=True``.

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        lr: the learning rate η. Default 0.15.
        betas: (β1, β2): decay rates of the gradient EMA m and of the squared Hessian-diagonal EMA v. Default (0.9,
            0.999).
        eps: ε in the denominator. Default 1e-4.
        weight_decay: λ: lr·λ·p is added to the step, as torch-optimizer does. Default 0.
        hessian_power: k, the power of the Hessian-diagonal denominator (√v)^k, in [0, 1]. Default 0.5.
        seed: seed of the Rademacher probes z of the Hutchinson estimate (saved in ``state_dict``). Default 0.
        kernel, on_nonfinite: how the update runs and what a NaN/Inf gradient does, as for
            :class:`~gradkit.optim.Optimizer` (defaults ``"auto"`` and ``"raise"``).
    """

    paper = "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning"
    #: The step differentiates through ``p.grad``: gradients must come from ``backward(create_graph=True)``.
    needs_graph: ClassVar[bool] = True

    def __init__(self, params: ParamsT, lr: float = 0.15, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-4, weight_decay: float = 0.0, hessian_power: float = 0.5, seed: int = 0, *,
                 kernel: str = "auto", on_nonfinite: str = "raise"):
        check_int("seed", seed)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def hessian_power(self) -> float:
        """The default ``hessian_power`` (groups may override it)."""
        return self.defaults["hessian_power"]

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_betas("betas", group["betas"], 2)
        check_positive("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_range("hessian_power", group["hessian_power"], 0.0, 1.0)

    # -- the probe generator is part of the state ---------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["gradkit"]["probe_generator"] = self._generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        gen_state = state_dict.get("gradkit", {}).get("probe_generator")
        super().load_state_dict(state_dict)
        if gen_state is not None:
            self._generator.set_state(gen_state)

    # -- step -----------------------------------------------------------------------------------------
    def _probe(self, p: torch.Tensor) -> torch.Tensor:
        z = torch.randint(0, 2, p.shape, generator=self._generator, dtype=p.dtype)
        return z.mul_(2).sub_(1).to(p.device)

    def _hutchinson(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """|H·z| per parameter (= |z ⊙ H·z| for z ∈ {±1}), averaged over conv kernels' spatial dimensions."""
        grads = [p.grad for p in params]
        linked = [i for i, g in enumerate(grads) if g.grad_fn is not None]
        if not linked:
            raise RuntimeError(
                f"{type(self).__name__}.step needs gradients with a graph to compute Hessian-vector products: "
                "call loss.backward(create_graph=True), or use gk.sources.Backprop(model, create_graph=True) "
                "in a Pipeline")
        probes = [self._probe(p) for p in params]  # drawn for every parameter, in order: reproducible
        with torch.enable_grad():
            hvs = torch.autograd.grad([grads[i] for i in linked], params, grad_outputs=[probes[i] for i in linked],
                                      allow_unused=True)
        out = []
        for p, hv in zip(params, hvs):
            d = torch.zeros_like(p) if hv is None else hv.detach().abs()
            if d.ndim >= 3:
                d = d.mean(dim=tuple(range(2, d.ndim)), keepdim=True).expand_as(d)
            out.append(d)
        return out

    def _step(self, active: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        params = [p for _, ps in active for p in ps]
        if not params:
            return
        diags = iter(self._hutchinson(params))
        for group, ps in active:
            ds = [next(diags) for _ in ps]
            for p in ps:
                p.grad = p.grad.detach()  # frees the graph (and the reference cycle param -> grad -> graph)
            if ps:
                self._update(group, ps, ds)

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], diags: list[torch.Tensor]) -> None:
        buckets: dict[int, list[int]] = {}
        for i, p in enumerate(params):
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_hessian_diag_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buckets.setdefault(state["step"], []).append(i)
        beta1, beta2 = group["betas"]
        k = group["hessian_power"]
        for step, idx in buckets.items():
            step += 1
            ps = [params[i] for i in idx]
            states = [self.state[p] for p in ps]
            for st in states:
                st["step"] = step
            scalars = dict(beta1c=1.0 - beta1, beta2=beta2, beta2c=1.0 - beta2, bc1=1.0 - beta1**step,
                           bc2_k=math.sqrt(1.0 - beta2**step) ** k, k=k, eps=group["eps"], lr=group["lr"],
                           wd=group["weight_decay"])
            ADAHESSIAN(self.kernel, [ps, [p.grad for p in ps], [diags[i] for i in idx],
                                     [st["exp_avg"] for st in states], [st["exp_hessian_diag_sq"] for st in states]],
                       scalars)
