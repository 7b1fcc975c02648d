"""MFAC: SGD preconditioned by the inverse of a damped empirical Fisher over a sliding window of gradients.

Paper: "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information" (Frantar, Kurtic & Alistarh,
2021), the optimisation algorithm ("dynamic" setting). With the last m gradients g_1 … g_m as the rows of
G ∈ R^{m×d} and damping λ:

    F = λ I + (1/m) Σ_i g_i g_iᵀ = λ I + (1/m) GᵀG,
    F⁻¹ v = λ⁻¹ v − λ⁻² Gᵀ (m I + λ⁻¹ G Gᵀ)⁻¹ G v                  (Woodbury)
    u = F⁻¹ g_t (g_t inserted in the window first),   θ ← θ − lr · u   (with optional momentum on u)

The paper's dynamic algorithm keeps the m×m Gram matrix G Gᵀ up to date (one row and column per step,
O(dm)) and factors m I + λ⁻¹ G Gᵀ (O(m³)); the product costs two passes over G (O(dm)). Its scalars D_ij and
coefficient matrix B are the entries of that factorisation without pivoting: for this symmetric positive
definite matrix the unpivoted LU is L·diag(L)·… of the Cholesky factor L, so we factor with Cholesky in
float64 and solve (same quantities, same cost, no unpivoted LU needed on CPU). Memory: G (m·d values of the
parameters' dtype) plus m² float64.

What we checked in the authors' code (read, not copied): the window is a ring buffer initialised with zero
gradients and the Fisher is always normalised by the full window size m (during the first m steps the empty
slots count as zero gradients), the newest gradient enters the window before its own product, coupled weight
decay (``g + λ_wd θ``) enters the window, momentum is an EMA of the preconditioned direction,
``v ← μ v + (1 − μ) u``, and the parameter update is ``θ ← θ − lr · v``. Their defaults are m = 1024, λ = 1e-5,
lr = 1e-3 on GPUs; ours keep λ and lr and use m = 32 (the O(m³) factorisation per step is the CPU cost).

Everything in all param groups forms ONE flat vector (the Fisher couples all parameters); per-group ``lr`` and
``weight_decay`` apply to their slices. A parameter without a gradient in a step contributes a zero slice to
the window and is not moved.

Why an optimizer and not a ``gk.transforms`` transform: the paper's method is the whole update (window insert,
preconditioned direction, momentum on that direction, decay inside the window), and its state — m·d values —
belongs with the parameters it moves, as an optimizer's state does (checkpointed, bucketed, copied with it). To
precondition some other update with the same product, use :class:`InverseFisherWindow` directly.
"""

from __future__ import annotations

from typing import Any

import torch

from .._validate import check_beta, check_int, check_nonneg, check_positive
from ._base import Optimizer, ParamsT

__all__ = ["MFAC", "InverseFisherWindow"]


class InverseFisherWindow:
    """The paper's dynamic algorithm: a window of m gradients and products with the damped inverse Fisher.

    ``update(g)`` replaces the oldest gradient (a ring buffer initialised with zeros); ``mul(v)`` returns
    ``(λ I + (1/m) Σ g_i g_iᵀ)⁻¹ v``; ``update_mul(g)`` does both, reusing ``G g``. Time per call O(d·m + m³),
    memory m·d + m². ``state_dict`` / ``load_state_dict`` round-trip bit for bit.

    Args:
        dim: d, the length of the gradients.
        m: window size (number of gradients).
        damp: λ > 0, the damping.
        dtype, device: of the stored gradients (the Gram matrix and factorisation are float64).
    """

    def __init__(self, dim: int, m: int, damp: float, *, dtype: torch.dtype = torch.float32, device=None):
        self.dim = check_int("dim", dim, 1)
        self.m = check_int("m", m, 1)
        self.damp = check_positive("damp", damp)
        self.grads = torch.zeros(self.m, self.dim, dtype=dtype, device=device)
        self.gram = torch.zeros(self.m, self.m, dtype=torch.float64, device=device)
        self.last = 0
        self.count = 0
        self._chol: torch.Tensor | None = None

    @classmethod
    def wrap(cls, state: dict[str, Any], damp: float) -> InverseFisherWindow:
        """A window over existing state tensors ``state["grads"]`` [m, d] and ``state["gram"]`` [m, m] (shared,
        updated in place), with ``state["last"]`` and ``state["count"]``."""
        self = cls.__new__(cls)
        self.grads, self.gram = state["grads"], state["gram"]
        self.m, self.dim = self.grads.shape
        self.damp = float(damp)
        self.last, self.count = int(state["last"]), int(state["count"])
        self._chol = None
        return self

    def _factor(self) -> torch.Tensor:
        if self._chol is None:
            eye = torch.eye(self.m, dtype=torch.float64, device=self.gram.device)
            self._chol = torch.linalg.cholesky(self.m * eye + self.gram / self.damp)
        return self._chol

    def update(self, g: torch.Tensor) -> torch.Tensor:
        """Insert ``g`` in place of the oldest gradient; returns ``G g`` (float64, the new Gram row)."""
        g = g.reshape(-1).to(self.grads.dtype)
        if g.numel() != self.dim:
            raise ValueError(f"g must have {self.dim} elements, got {g.numel()}")
        self.grads[self.last].copy_(g)
        row = (self.grads @ g).to(torch.float64)
        self.gram[self.last, :] = row
        self.gram[:, self.last] = row
        self.last = (self.last + 1) % self.m
        self.count += 1
        self._chol = None
        return row

    def mul(self, v: torch.Tensor, gv: torch.Tensor | None = None) -> torch.Tensor:
        """``F⁻¹ v`` (``gv`` = ``G v`` when already known)."""
        v = v.reshape(-1)
        if gv is None:
            gv = (self.grads @ v.to(self.grads.dtype)).to(torch.float64)
        coef = torch.cholesky_solve(gv[:, None], self._factor())[:, 0] / (self.damp * self.damp)
        return v / self.damp - (coef.to(self.grads.dtype) @ self.grads).to(v.dtype)

    def update_mul(self, g: torch.Tensor) -> torch.Tensor:
        """``update(g)`` then ``F⁻¹ g`` with the new window."""
        return self.mul(g, self.update(g))

    def dense_inverse(self) -> torch.Tensor:
        """``F⁻¹`` as a dense d×d float64 matrix (for tests and small problems only)."""
        g = self.grads.to(torch.float64)
        f = self.damp * torch.eye(self.dim, dtype=torch.float64, device=g.device) + g.T @ g / self.m
        return torch.linalg.inv(f)

    def state_dict(self) -> dict[str, Any]:
        return {"grads": self.grads.clone(), "gram": self.gram.clone(), "last": self.last, "count": self.count,
                "m": self.m, "damp": self.damp}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["grads"].shape != self.grads.shape:
            raise ValueError(f"window state has shape {tuple(state['grads'].shape)}, "
                             f"expected {tuple(self.grads.shape)}")
        self.grads.copy_(state["grads"])
        self.gram.copy_(state["gram"])
        self.last, self.count = int(state["last"]), int(state["count"])
        self._chol = None


class MFAC(Optimizer):
    """M-FAC: SGD on the inverse-empirical-Fisher-preconditioned gradient (see the module docstring).

    Args:
        params: parameters or param groups (one shared window over all of them).
        lr: learning rate (default 1e-3, the authors').
        m: window size, the number of past gradients (default 32; the authors use 1024 on GPUs).
        damp: λ, the damping of the Fisher (default 1e-5, the authors').
        momentum: μ of the EMA of the preconditioned direction (default 0).
        weight_decay: coupled L2, added to the gradient before it enters the window (default 0).
        kernel: accepted for the common optimizer interface and validated; the step is matrix products over
            one flat vector, the same on every kernel.
        on_nonfinite: ``"raise"`` (default) | ``"skip"`` | ``"ignore"`` (see :class:`gradkit.optim.Optimizer`).
    """

    paper = "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information"

    def __init__(self, params: ParamsT, lr: float = 1e-3, m: int = 32, damp: float = 1e-5, momentum: float = 0.0,
                 weight_decay: float = 0.0, *, kernel: str = "foreach", on_nonfinite: str = "raise"):
        self.m = check_int("m", m, 1)
        self.damp = check_positive("damp", damp)
        self.momentum = check_beta("momentum", momentum)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), kernel=kernel, on_nonfinite=on_nonfinite)

    # torch.optim.Optimizer pickles only defaults/state/param_groups; keep every attribute so copies step.
    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_nonneg("weight_decay", group["weight_decay"])

    def window(self) -> InverseFisherWindow | None:
        """The current window (sharing the optimizer state's tensors), or None before the first step."""
        st = self.state.get("mfac")
        return None if st is None else InverseFisherWindow.wrap(st, self.damp)

    def _step(self, active: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        have = {id(p) for _, ps in active for p in ps}
        if not have:
            return
        ref = next(p for _, ps in active for p in ps)
        d = sum(p.numel() for g in self.param_groups for p in g["params"])
        st = self.state.get("mfac")
        if st is None or st["grads"].shape != (self.m, d):
            # First step (or the parameter set changed): a fresh window of zero gradients, as the authors'.
            st = self.state["mfac"] = {
                "grads": torch.zeros(self.m, d, dtype=ref.dtype, device=ref.device),
                "gram": torch.zeros(self.m, self.m, dtype=torch.float64, device=ref.device),
                "last": 0, "count": 0, "step": 0, "momentum_buffer": None}
        window = InverseFisherWindow.wrap(st, self.damp)
        parts, slices = [], []
        offset = 0
        for group in self.param_groups:
            for p in group["params"]:
                n = p.numel()
                if id(p) in have:
                    g = p.grad.reshape(-1)
                    if group["weight_decay"] != 0:
                        g = g + group["weight_decay"] * p.detach().reshape(-1)
                    parts.append(g.to(window.grads.dtype))
                    slices.append((group, p, offset, n))
                else:
                    parts.append(torch.zeros(n, dtype=window.grads.dtype, device=window.grads.device))
                offset += n
        u = window.update_mul(torch.cat(parts))
        st["last"], st["count"] = window.last, window.count
        if self.momentum:
            buf = st["momentum_buffer"]
            buf = torch.zeros_like(u) if buf is None else buf
            buf.mul_(self.momentum).add_(u, alpha=1 - self.momentum)
            st["momentum_buffer"] = buf
            u = buf
        for group, p, start, n in slices:
            p.add_(u[start:start + n].view_as(p).to(p.dtype), alpha=-group["lr"])
        st["step"] += 1
