"""Muon: momentum orthogonalised by Newton–Schulz for matrices, AdamW for everything else.

Paper: "Muon: An optimizer for hidden layers in neural networks" (Keller Jordan et al., 2024); the
``match_rms_adamw`` scaling is from "Muon is Scalable for LLM Training" (Liu et al., 2025).

    B ← μ·B + (1−μ)·G,   U = G + μ·(B − G) (Nesterov) or B,   O = NS₅(U reshaped to rows × (numel/rows))
    W ← W·(1 − lr·λ) − lr·s·O,   s = √max(1, rows/cols) ("original") or 0.2·√max(rows, cols) ("match_rms_adamw")

NS₅ (:mod:`gradkit._kernels.orthogonalize`) maps each singular value σ of U to φ⁵(σ/‖U‖_F), which lies in
[0.68, 1.13] for σ ≥ 0.01·‖U‖_F (and in [0.47, 1.21] down to 1e-3). Conv kernels (≥ 3-D) are orthogonalised as
``(out_channels, in·kh·kw)`` matrices.

Which tensors Muon handles is chosen per parameter group by ``use_muon``: ``None`` (default) means
automatic: tensors with ≥ 2 dimensions get Muon, the rest (biases, norm gains) get AdamW with ``adamw_lr``,
``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``; ``True``/``False`` force one or the other for the
whole group. Embeddings and output heads are 2-D but should use AdamW (the paper's advice): build the groups
with :meth:`Muon.param_groups` from a model, which does that, or mark them with ``use_muon=False``. The AdamW
rate follows an LR scheduler: it is ``adamw_lr · lr / initial_lr``, with ``initial_lr`` the key torch's
schedulers set on each group (so without a scheduler it is just ``adamw_lr``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._kernels import Elementwise
from .._kernels.orthogonalize import NS_COEFFICIENTS, newton_schulz_many
from .._validate import check_betas, check_choice, check_int, check_nonneg, check_positive, check_range
from ._base import Optimizer, ParamsT
from .adam import ADAM

__all__ = ["Muon"]

ADJUST_LR = ("original", "match_rms_adamw")


def _momentum(buf, g, u, *, beta_c, mu, nesterov=True):
    buf.lerp_(g, beta_c)
    u.copy_(g)
    if nesterov:
        u.lerp_(buf, mu)
    else:
        u.copy_(buf)


def _apply(p, o, *, decay, lr):
    p.mul_(decay)
    p.sub_(o * lr)


MOMENTUM = Elementwise(_momentum, "muon_momentum")
APPLY = Elementwise(_apply, "muon_apply")


def _shape_scale(shape: torch.Size, adjust_lr: str) -> float:
    rows, cols = shape[0], math.prod(shape[1:])
    if adjust_lr == "original":
        return math.sqrt(max(1.0, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


class Muon(Optimizer):
    """Muon for matrices (and reshaped conv kernels), AdamW for the other tensors, in one optimizer.

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        lr: the learning rate η of the orthogonalised step. Default 0.02.
        momentum: μ, the momentum of B. Default 0.95.
        nesterov: use the Nesterov form U = G + μ·(B − G) instead of B. Default True.
        weight_decay: λ, decoupled, for Muon tensors: W ← W·(1 − lr·λ). Default 0.
        ns_steps: the number of Newton-Schulz iterations. Default 5.
        ns_coefficients: (a, b, c) of the quintic Newton-Schulz iteration. Default the authors' (3.4445, -4.7750,
            2.0315).
        adjust_lr: the shape scaling s, ``'original'`` (√max(1, rows/cols)) or ``'match_rms_adamw'`` (0.2·√max(rows,
            cols)). Default 'original'.
        adamw_lr: the AdamW learning rate of non-Muon tensors (follows an LR scheduler). Default 3e-4.
        adamw_betas: AdamW's (β1, β2) for non-Muon tensors. Default (0.9, 0.95).
        adamw_eps: AdamW's ε. Default 1e-8.
        adamw_weight_decay: AdamW's decoupled λ. Default 0.
        use_muon: which tensors get Muon: None (tensors with ≥ 2 dimensions), True or False for the whole group. Default
            None.
        kernel, on_nonfinite: how the update runs and what a NaN/Inf gradient does, as for
            :class:`~gradkit.optim.Optimizer` (defaults ``"auto"`` and ``"raise"``).
    """

    paper = "Muon: An optimizer for hidden layers in neural networks"

    def __init__(self, params: ParamsT, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5,
                 ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, adjust_lr: str = "original",
                 adamw_lr: float = 3e-4, adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float = 0.0, use_muon: bool | None = None, *, kernel: str = "auto",
                 on_nonfinite: str = "raise"):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        ns_coefficients=tuple(ns_coefficients), adjust_lr=adjust_lr, adamw_lr=adamw_lr,
                        adamw_betas=adamw_betas,
                        adamw_eps=adamw_eps, adamw_weight_decay=adamw_weight_decay, use_muon=use_muon)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)

    @staticmethod
    def param_groups(model: nn.Module, exclude: Sequence[str] = ("head",), **muon_group: Any
                     ) -> list[dict[str, Any]]:
        """Two groups from ``model``: Muon for hidden matrices, AdamW for the rest.

        AdamW gets every tensor with < 2 dimensions, every ``nn.Embedding`` weight (so a tied output head too),
        and every parameter whose qualified name contains one of ``exclude``. ``muon_group`` entries
        (``lr=...``) go to the Muon group.
        """
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        muon, adamw, seen = [], [], set()
        for name, p in model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            hidden = p.ndim >= 2 and id(p) not in embeddings and not any(s in name for s in exclude)
            (muon if hidden else adamw).append(p)
        return [g for g in ({"params": muon, "use_muon": True, **muon_group}, {"params": adamw, "use_muon": False})
                if g["params"]]

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_nonneg("weight_decay", group["weight_decay"])
        check_int("ns_steps", group["ns_steps"], 1)
        coeffs = group["ns_coefficients"]
        if not isinstance(coeffs, Sequence) or len(coeffs) != 3:
            raise ValueError(f"ns_coefficients must be 3 numbers (a, b, c), got {coeffs!r}")
        check_choice("adjust_lr", group["adjust_lr"], ADJUST_LR)
        check_nonneg("adamw_lr", group["adamw_lr"])
        check_betas("adamw_betas", group["adamw_betas"], 2)
        check_positive("adamw_eps", group["adamw_eps"])
        check_nonneg("adamw_weight_decay", group["adamw_weight_decay"])
        check_choice("use_muon", group["use_muon"], (None, True, False))
        if group["use_muon"]:
            for p in group.get("params", ()):
                if isinstance(p, torch.Tensor) and p.ndim < 2:
                    raise ValueError(f"use_muon=True needs parameters with >= 2 dimensions, got shape "
                                     f"{tuple(p.shape)}")

    def _uses_muon(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        return p.ndim >= 2 if group["use_muon"] is None else bool(group["use_muon"])

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        muon = [p for p in params if self._uses_muon(group, p)]
        adamw = [p for p in params if not self._uses_muon(group, p)]
        if muon:
            self._muon_step(group, muon)
        if adamw:
            self._adamw_step(group, adamw)

    def _muon_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in params]
        updates = [torch.empty_like(g) for g in grads]
        mu = group["momentum"]
        MOMENTUM.variant(nesterov=bool(group["nesterov"]))(self.kernel, [bufs, grads, updates],
                                                            dict(beta_c=1.0 - mu, mu=mu))
        ortho = newton_schulz_many([u.reshape(u.shape[0], -1) for u in updates], group["ns_steps"],
                                   group["ns_coefficients"])
        for o, p in zip(ortho, params):
            o.mul_(_shape_scale(p.shape, group["adjust_lr"]))
        ortho = [o.view(p.shape) for o, p in zip(ortho, params)]
        APPLY(self.kernel, [params, ortho], dict(decay=1.0 - group["lr"] * group["weight_decay"], lr=group["lr"]))

    def _adamw_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        buckets: dict[int, list[torch.Tensor]] = {}
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buckets.setdefault(state["step"], []).append(p)
        beta1, beta2 = group["adamw_betas"]
        lr0 = group.get("initial_lr", group["lr"])
        lr = group["adamw_lr"] * (group["lr"] / lr0 if lr0 > 0 else 1.0)
        for step, ps in buckets.items():
            step += 1
            states = [self.state[p] for p in ps]
            for st in states:
                st["step"] = step
            scalars = dict(decay=1.0 - lr * group["adamw_weight_decay"], l2=0.0, beta1c=1.0 - beta1,
                           beta2c=1.0 - beta2, step_size=lr / (1.0 - beta1**step),
                           bc2_sqrt=math.sqrt(1.0 - beta2**step), eps=group["adamw_eps"])
            ADAM(self.kernel, [ps, [p.grad for p in ps], [st["exp_avg"] for st in states],
                               [st["exp_avg_sq"] for st in states]], scalars)
