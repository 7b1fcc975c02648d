"""FRUGAL: Adam on a low-dimensional subspace of the gradient, state-free signSGD on the rest.

Paper: "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training"
(Zmushko et al., ICML 2025).

    every T steps pick P (rows × r, orthonormal columns) and reset the state;   g_s = Pᵀg,  g_r = g − P·g_s
    m, v ← Adam moments of g_s (r × cols);   p ← p·(1 − lr·λ) − lr·P·m̂/(√v̂ + ε) − lr_free·sign(g_r)

Matrices (and conv kernels, as ``(out, in·kh·kw)``) are split this way, projecting along their shorter side
with rank r = ⌈``density``·min(rows, cols)⌉. ``proj`` chooses the subspace: ``"svd"`` (top-r left singular
vectors of the current gradient, as GaLore), ``"random"`` (a seeded random orthonormal basis) or ``"block"``
(no projection: a ⌈density·N⌉-tensor subset of the group's N matrices gets full Adam, the rest signSGD,
the subset moving round-robin at each refresh). Optimizer state is only kept for the subspace — m, v and P
cost ``r·(cols + rows)`` numbers per matrix instead of Adam's ``2·rows·cols`` — and it is reset at every
refresh, as in the paper. Tensors with fewer than 2 dimensions (biases, norm gains) always get full Adam,
the paper's choice for the small "sensitive" parameters.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._kernels import Elementwise
from .._validate import check_betas, check_choice, check_int, check_nonneg, check_positive, check_range
from ._base import Optimizer, ParamsT
from .adam import ADAM

__all__ = ["FRUGAL"]

PROJECTIONS = ("svd", "random", "block")


def _state_free(p, r, *, decay, lr_free):
    p.mul_(decay)
    p.sub_(r.sign().mul_(lr_free))


STATE_FREE = Elementwise(_state_free, "frugal_state_free")


def _tall(t: torch.Tensor) -> bool:
    return t.shape[0] > t[0].numel()


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The 2-D view that is projected: ``(rows, cols)`` with rows ≤ cols (transposed if needed)."""
    m = t.reshape(t.shape[0], -1)
    return m.T if _tall(t) else m


def _from_matrix(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (m.T if _tall(like) else m).reshape(like.shape)


class FRUGAL(Optimizer):
    """FRUGAL: stateful AdamW on a refreshed subspace of each matrix, signSGD on the complement.

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        lr: the learning rate of the Adam subspace step. Default 1e-3.
        betas: (β1, β2), Adam's moment decay rates in the subspace. Default (0.9, 0.999).
        eps: ε in Adam's denominator. Default 1e-8.
        weight_decay: λ, decoupled: p ← p·(1 − lr·λ). Default 0.
        density: the fraction ρ of each matrix's shorter side kept in the stateful subspace (rank r = ⌈ρ·min(rows,
            cols)⌉), or of the group's matrices with ``proj='block'``. Default 0.25.
        proj: how the subspace is chosen: ``'svd'``, ``'random'`` or ``'block'``. Default 'svd'.
        update_gap: T, the number of steps between subspace refreshes (the state is reset then). Default 200.
        free_lr: the learning rate of the state-free signSGD step on the complement (None: ``lr``). Default None.
        seed: seed of the random projections and block choices. Default 0.
        kernel, on_nonfinite: how the update runs and what a NaN/Inf gradient does, as for
            :class:`~gradkit.optim.Optimizer` (defaults ``"auto"`` and ``"raise"``).
    """

    paper = "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training"

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, density: float = 0.25, proj: str = "svd",
                 update_gap: int = 200, free_lr: float | None = None, seed: int = 0, *, kernel: str = "auto",
                 on_nonfinite: str = "raise"):
        check_int("seed", seed)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density, proj=proj,
                        update_gap=update_gap, free_lr=free_lr)
        super().__init__(params, defaults, kernel=kernel, on_nonfinite=on_nonfinite)
        self.seed = seed

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_betas("betas", group["betas"], 2)
        check_positive("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_range("density", group["density"], 0.0, 1.0, low_open=True)
        check_choice("proj", group["proj"], PROJECTIONS)
        check_int("update_gap", group["update_gap"], 1)
        if group["free_lr"] is not None:
            check_nonneg("free_lr", group["free_lr"])

    # -- subspaces ------------------------------------------------------------------------------------
    def _index(self, p: torch.Tensor) -> int:
        return next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is p)

    def _projector(self, group: dict[str, Any], p: torch.Tensor, refresh: int) -> torch.Tensor:
        g = _as_matrix(p.grad)
        r = max(1, math.ceil(group["density"] * g.shape[0]))
        if group["proj"] == "svd":
            u = torch.linalg.svd(g.float(), full_matrices=False)[0]
            return u[:, :r].to(g.dtype).contiguous()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._index(p) * 10_007 + refresh)
        a = torch.randn(g.shape[0], r, generator=gen, dtype=torch.float32)
        return torch.linalg.qr(a)[0].to(device=g.device, dtype=g.dtype)

    def _block_active(self, group: dict[str, Any], p: torch.Tensor, refresh: int) -> bool:
        mats = [q for q in group["params"] if q.ndim >= 2]
        n = len(mats)
        k = max(1, math.ceil(group["density"] * n))
        i = next(j for j, q in enumerate(mats) if q is p)
        return (i - refresh * k) % n < k

    # -- step -----------------------------------------------------------------------------------------
    def _adam(self, group: dict[str, Any], grads: list[torch.Tensor], states: list[dict[str, Any]],
              targets: list[torch.Tensor], decay: float) -> None:
        """Adam moments of ``grads`` in ``states``; ``targets ← decay·targets − lr·m̂/(√v̂+ε)``."""
        beta1, beta2 = group["betas"]
        buckets: dict[int, list[int]] = {}
        for i, st in enumerate(states):
            buckets.setdefault(st["adam_step"], []).append(i)
        for step, idx in buckets.items():
            step += 1
            for i in idx:
                states[i]["adam_step"] = step
            scalars = dict(decay=decay, l2=0.0, beta1c=1.0 - beta1, beta2c=1.0 - beta2,
                           step_size=group["lr"] / (1.0 - beta1**step), bc2_sqrt=math.sqrt(1.0 - beta2**step),
                           eps=group["eps"])
            ADAM(self.kernel, [[targets[i] for i in idx], [grads[i] for i in idx],
                               [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx]], scalars)

    @staticmethod
    def _reset(state: dict[str, Any], shape: torch.Size | None, like: torch.Tensor) -> None:
        for k in ("exp_avg", "exp_avg_sq", "projector"):
            state.pop(k, None)
        if shape is not None:
            state["exp_avg"] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        state["adam_step"] = 0

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr = group["lr"]
        decay = 1.0 - lr * group["weight_decay"]
        lr_free = lr if group["free_lr"] is None else group["free_lr"]
        full: list[torch.Tensor] = []  # tensors updated by full AdamW: vectors, and active blocks
        proj: list[torch.Tensor] = []  # matrices split into subspace + complement
        free: list[torch.Tensor] = []  # matrices updated by signSGD only (inactive blocks)
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
            t = state["step"]
            refresh, new = divmod(t, group["update_gap"])
            new = new == 0
            if p.ndim < 2:
                if new and t == 0:
                    self._reset(state, p.shape, p)
                full.append(p)
            elif group["proj"] == "block":
                active = self._block_active(group, p, refresh)
                if new:
                    self._reset(state, p.shape if active else None, p)
                (full if active else free).append(p)
            else:
                if new:
                    P = self._projector(group, p, refresh)
                    self._reset(state, torch.Size((P.shape[1], _as_matrix(p).shape[1])), p)
                    state["projector"] = P
                proj.append(p)
            state["step"] = t + 1
        if full:
            self._adam(group, [p.grad for p in full], [self.state[p] for p in full], full, decay)
        if free:
            STATE_FREE(self.kernel, [free, [p.grad for p in free]], dict(decay=decay, lr_free=lr_free))
        if proj:
            states = [self.state[p] for p in proj]
            mats = [_as_matrix(p.grad) for p in proj]
            low = [st["projector"].T @ g for st, g in zip(states, mats)]
            resid = [_from_matrix(g - st["projector"] @ s, p) for p, g, st, s in zip(proj, mats, states, low)]
            STATE_FREE(self.kernel, [proj, resid], dict(decay=decay, lr_free=lr_free))
            steps = [torch.zeros_like(s) for s in low]
            self._adam(group, low, states, steps, 1.0)
            for p, st, u in zip(proj, states, steps):
                p.add_(_from_matrix(st["projector"] @ u, p))
