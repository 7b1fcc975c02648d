"""The gradient of a per-sample objective from any ``gk.sources`` source (private).

Guidance that needs ``∇_x f(x)`` (a classifier's log-probability, a reward) gets it from a
:class:`gradkit.sources.Source` built once on a persistent leaf buffer of the batch's shape; each call copies the
point into the buffer, asks the source for the gradient of the per-sample losses ``−f(x)[b]`` and passes the
result through the given ``gk.transforms``. ``Backprop`` (default) is exact; ``SPSA`` / ``ES`` /
``ForwardGradient`` need only evaluations of f, so f may be a black box. With per-sample (batched) closures
row b's estimate uses only loss[b] and row b of each direction; a source without them gets the sum of the losses,
and every row's estimate then carries the other rows' noise (a warning says so, once).

Scale: a guidance scale is tuned for a gradient's length. SPSA, ForwardGradient and ES with raw fitness
(``rank_shaping=False``, unbiased for the smoothed objective) estimate that length; ES with rank shaping returns a
direction of a different, data-independent size, so a scale tuned with backprop can blow up
(``gradkit bench guide`` shows the row).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import NonFiniteError
from ._util import nonfinite_policy

Tensor = torch.Tensor

__all__ = ["GradientEstimator"]


def _default_source(buffer: Tensor):
    from ..sources import Backprop

    return Backprop(buffer)


class GradientEstimator:
    """``∇_x f`` per sample, from a source on a persistent buffer.

    Args:
        source: a factory ``source(buffer) -> Source`` — a source class (``gk.sources.SPSA``) or
            ``functools.partial(gk.sources.SPSA, eps=1e-3, n_directions=8, seed=0)``; default ``Backprop``.
        transforms: ``gk.transforms`` applied to the buffer's gradient (e.g. ``ClipNorm``; note they see the
            whole batch as one tensor).
        on_nonfinite: ``"raise"`` (default), ``"skip"`` (rows whose value or gradient is NaN/Inf get a zero
            gradient and are counted in ``skipped``) or ``"ignore"``.
    """

    def __init__(self, source: Callable[[Tensor], Any] | None = None, transforms: Sequence[Any] = (),
                 on_nonfinite: str = "raise"):
        if source is not None and not callable(source):
            raise ValueError(f"source must be a factory source(buffer) -> Source, got {type(source).__name__}")
        self.factory = source if source is not None else _default_source
        self.transforms = list(transforms)
        for tr in self.transforms:
            if not callable(tr):
                raise ValueError(f"transforms must be callables on parameters, got {type(tr).__name__}")
        self.on_nonfinite = nonfinite_policy(on_nonfinite)
        self.buffer: Tensor | None = None
        self.source: Any = None
        self.skipped = 0
        self._pending: dict[str, Any] | None = None
        self._warned = False

    def _ensure(self, x: Tensor) -> None:
        b = self.buffer
        if b is None or b.shape != x.shape or b.dtype != x.dtype or b.device != x.device:
            self.buffer = torch.zeros_like(x, requires_grad=True)
            self.source = self.factory(self.buffer)
            if self._pending is not None:
                self.source.load_state_dict(self._pending)
                self._pending = None

    def _is_backprop(self) -> bool:
        from ..sources import Backprop

        return isinstance(self.source, Backprop)

    def __call__(self, x: Tensor, f: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """``(∇_x f(x) [B, ...], f(x) [B])`` for a per-sample objective ``f(x) -> [B]`` to *increase*."""
        self._ensure(x)
        buf = self.buffer
        with torch.no_grad():
            buf.copy_(x.detach())
        seen: dict[str, Tensor] = {}
        skip = self.on_nonfinite == "skip"

        def per_sample() -> Tensor:
            vals = f(buf)
            if vals.ndim != 1 or vals.shape[0] != buf.shape[0]:
                raise ValueError(f"the objective must return one value per sample ([{buf.shape[0]}]), "
                                 f"got shape {tuple(vals.shape)}")
            seen.setdefault("first", vals.detach())
            if skip:  # a non-finite row must not poison the others: it is dropped (and counted) below
                fin = torch.isfinite(vals.detach())
                seen["bad"] = seen.get("bad", torch.zeros_like(fin)) | ~fin
                vals = torch.where(fin, vals, torch.zeros_like(vals))
            return -vals

        try:
            if self._is_backprop():
                out = self.source.estimate(lambda: per_sample().sum())
            else:
                try:
                    out = self.source.estimate(per_sample)
                except ValueError as e:
                    if "scalar" not in str(e):
                        raise
                    if not self._warned:
                        warnings.warn(f"{type(self.source).__name__} does not take per-sample closures yet: the "
                                      "guidance gradient is estimated on the sum over the batch, so each sample's "
                                      "estimate carries the other samples' noise", RuntimeWarning, stacklevel=3)
                        self._warned = True
                    seen.clear()
                    out = self.source.estimate(lambda: per_sample().sum())
        except NonFiniteError:
            if self.on_nonfinite != "skip":
                raise
            self.skipped += x.shape[0]
            return torch.zeros_like(x), torch.full((x.shape[0],), float("nan"), dtype=x.dtype, device=x.device)
        for tr in self.transforms:
            tr([buf])
        g = buf.grad
        grad = torch.zeros_like(x) if g is None else -g.detach().clone()
        buf.grad = None
        vals = seen.get("first")
        if isinstance(out, Tensor) and out.ndim == 1 and out.shape[0] == x.shape[0]:
            vals = -out.detach()
        if vals is None:
            vals = torch.full((x.shape[0],), float("nan"), dtype=x.dtype, device=x.device)
        if self.on_nonfinite != "ignore":
            bad = ~torch.isfinite(grad.flatten(1)).all(1) | ~torch.isfinite(vals)
            if "bad" in seen:
                bad = bad | seen["bad"]
            if bool(bad.any()):
                if self.on_nonfinite == "raise":
                    raise NonFiniteError(f"the guidance gradient or objective is non-finite for rows "
                                         f"{bad.nonzero().flatten().tolist()}; nothing was updated")
                grad[bad] = 0.0
                self.skipped += int(bad.sum())
        return grad, vals

    def state_dict(self) -> dict[str, Any]:
        src = self.source.state_dict() if self.source is not None else (self._pending or {})
        return {"source": src, "transforms": [tr.state_dict() for tr in self.transforms if hasattr(tr, "state_dict")],
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.source is not None:
            self.source.load_state_dict(state["source"])
        else:
            self._pending = dict(state["source"]) if state["source"] else None
        trs = [tr for tr in self.transforms if hasattr(tr, "state_dict")]
        for tr, st in zip(trs, state["transforms"]):
            tr.load_state_dict(st)
        self.skipped = int(state["skipped"])
