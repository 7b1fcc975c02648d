"""Grokfast: amplify the slow-varying component of the gradient.

Paper: "Grokfast: Accelerated Grokking by Amplifying Slow Gradients" (Lee et al., 2024).
EMA filter: μ_1 = g_1, μ_t = α·μ_{t−1} + (1−α)·g_t, then g_t ← g_t + λ·μ_t. MA filter: once ``window`` gradients are
stored, g_t ← g_t + λ·mean(g_{t−w+1..t}).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

from .._kernels import group_by_device_dtype
from .._validate import check_beta, check_choice, check_int, check_nonneg
from ._norms import global_norm, has_graph, replace_grads
from .base import Transform

__all__ = ["Grokfast"]


class Grokfast(Transform):
    """Low-pass filter the gradient of every parameter and add the filtered signal back, ``lamb`` times.

    ``kind="ema"`` (the paper's Grokfast-EMA, Algorithm 2) keeps one buffer per parameter, initialised with the
    first gradient; ``kind="ma"`` (Grokfast-MA, Algorithm 1, ``warmup=True``) keeps the last ``window`` gradients
    and leaves the gradient unchanged until the window is full. Buffers are matched to parameters by position:
    call it with the same parameter list every step (as :class:`gradkit.Pipeline` does). A parameter without a
    gradient in a step (frozen) is skipped and its buffer left as it was. All updates are foreach calls.
    Returns ``{"filtered_norm": ‖λ·filter‖ over all tensors}`` (0-d tensor), absent while the MA window fills.

    Args:
        alpha: α, the EMA momentum of the filter (kind ``'ema'``). Default 0.98.
        lamb: λ, the amplification of the slow component added back to the gradient. Default 2.0.
        kind: ``'ema'`` (Grokfast-EMA) or ``'ma'`` (Grokfast-MA, a moving average over ``window`` steps). Default 'ema'.
        window: w, the window of the moving average (kind ``'ma'``). Default 100.
    """

    paper = "Grokfast: Accelerated Grokking by Amplifying Slow Gradients"

    def __init__(self, alpha: float = 0.98, lamb: float = 2.0, kind: str = "ema", window: int = 100):
        self.alpha = check_beta("alpha", alpha)
        self.lamb = check_nonneg("lamb", lamb)
        self.kind = check_choice("kind", kind, ("ema", "ma"))
        self.window = check_int("window", window, 1)
        self._ema: dict[int, torch.Tensor] = {}
        self._hist: dict[int, deque[torch.Tensor]] = {}
        self._n_params: int | None = None

    def _indexed(self, params: Iterable[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
        params = list(params)
        if self._n_params is None:
            self._n_params = len(params)
        elif len(params) != self._n_params:
            raise ValueError(f"Grokfast was called with {len(params)} parameters, earlier with {self._n_params}: "
                             "buffers are matched by position, pass the same parameter list every step")
        return [(i, p) for i, p in enumerate(params) if p.grad is not None]

    @torch.no_grad()
    def __call__(self, params: Iterable[torch.Tensor]) -> dict[str, Any]:
        items = self._indexed(params)
        if not items:
            return {}
        if self.kind == "ema":
            filt = self._ema_update(items)
        else:
            filt = self._ma_update(items)
            if filt is None:
                return {}
        grads = [p.grad for _, p in items]
        if has_graph(grads):
            with torch.enable_grad():  # out of place: the graph of .grad is still needed (AdaHessian)
                replace_grads([p for _, p in items], [torch.add(g, f, alpha=self.lamb) for g, f in zip(grads, filt)])
        else:
            for g_group, f_group in group_by_device_dtype([grads, filt]):
                torch._foreach_add_(g_group, f_group, alpha=self.lamb)
        return {"filtered_norm": self.lamb * global_norm(filt)}

    def _ema_update(self, items: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        fresh = [(i, p) for i, p in items if i not in self._ema]
        old = [(i, p) for i, p in items if i in self._ema]
        for i, p in fresh:
            self._ema[i] = p.grad.detach().clone()
        if old:
            emas, grads = [self._ema[i] for i, _ in old], [p.grad.detach() for _, p in old]
            for e_group, g_group in group_by_device_dtype([emas, grads]):
                # lerp_(g, 1-α) is α·μ + (1-α)·g in one pass.
                torch._foreach_lerp_(e_group, g_group, 1.0 - self.alpha)
        return [self._ema[i] for i, _ in items]

    def _ma_update(self, items: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor] | None:
        for i, p in items:
            self._hist.setdefault(i, deque(maxlen=self.window)).append(p.grad.detach().clone())
        if any(len(self._hist[i]) < self.window for i, _ in items):
            return None
        means = [torch.zeros_like(p.grad) for _, p in items]
        for k in range(self.window):
            hist_k = [self._hist[i][k] for i, _ in items]
            for m_group, h_group in group_by_device_dtype([means, hist_k]):
                torch._foreach_add_(m_group, h_group)
        torch._foreach_div_(means, float(self.window))
        return means

    def state_dict(self) -> dict[str, Any]:
        return {"n_params": self._n_params, "ema": {i: t.clone() for i, t in self._ema.items()},
                "hist": {i: [t.clone() for t in h] for i, h in self._hist.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._n_params = state["n_params"]
        self._ema = {int(i): t.clone() for i, t in state["ema"].items()}
        self._hist = {int(i): deque((t.clone() for t in h), maxlen=self.window) for i, h in state["hist"].items()}

    def __repr__(self) -> str:
        extra = f", window={self.window}" if self.kind == "ma" else ""
        return f"Grokfast(alpha={self.alpha}, lamb={self.lamb}, kind={self.kind!r}{extra})"
