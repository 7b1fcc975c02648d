"""AutoClip: clip to a percentile of the gradient norms seen so far.

Paper: "AutoClip: Adaptive Gradient Clipping for Source Separation Networks" (Seetharaman et al., 2020).
Rule: append ‖g_t‖ to the history h; c_t = percentile_p(h) (linear interpolation, as ``numpy.percentile``);
g ← g · min(1, c_t / (‖g‖ + 1e-6)).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

from .._validate import check_int, check_range
from ._norms import NORM_EPS, measure, scale_grads
from .base import Transform

__all__ = ["AutoClip"]


def percentile(values: list[float], q: float) -> float:
    """``numpy.percentile(values, q)`` with the default linear interpolation, in double precision."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class AutoClip(Transform):
    """Clip the global 2-norm to the ``percentile``-th percentile of all gradient norms observed so far.

    ``history=None`` keeps every norm (as in the paper; memory and the sort grow with the step count);
    ``history=N`` keeps the last ``N`` only, which also lets the threshold follow a drifting norm.
    The current norm is part of the history before the percentile is taken, so the first step is never clipped.
    One host synchronisation per step (the norm joins a Python history).
    Returns ``{"grad_norm", "clip_value", "clipped"}`` as Python numbers.

    Args:
        percentile: p, the percentile (in (0, 100]) of the observed norms used as the clipping threshold. Default 10.
        history: keep only the last N norms (None: all of them, as in the paper). Default None.
    """

    paper = "AutoClip: Adaptive Gradient Clipping for Source Separation Networks"
    keeps_finite = True

    def __init__(self, percentile: float = 10.0, history: int | None = None):
        self.percentile = check_range("percentile", percentile, 0.0, 100.0, low_open=True)
        self.history = None if history is None else check_int("history", history, 1)
        self._norms: deque[float] = deque(maxlen=self.history)

    def __call__(self, params: Iterable[torch.Tensor]) -> dict[str, Any]:
        if (measured := measure(params)) is None:
            return {}
        ps, grads, norm = measured[0], measured[1], float(measured[2])  # the decision is taken on the host
        self._norms.append(norm)
        clip = percentile(list(self._norms), self.percentile)
        clipped = norm > clip
        if clipped:
            scale_grads(ps, grads, clip / (norm + NORM_EPS))
        return {"grad_norm": norm, "clip_value": clip, "clipped": clipped}

    def state_dict(self) -> dict[str, Any]:
        return {"norms": list(self._norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._norms = deque((float(v) for v in state["norms"]), maxlen=self.history)

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile}, history={self.history})"
