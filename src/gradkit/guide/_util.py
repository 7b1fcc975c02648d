"""Small shared helpers of gradkit.guide (private)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._validate import check_choice, check_nonfinite, check_range

Tensor = torch.Tensor

FORMULATIONS = ("diffusers", "original")


def flat_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product over all non-batch dims, shaped ``[B, 1, ...]`` to broadcast."""
    return (a * b).flatten(1).sum(1).reshape(-1, *([1] * (a.ndim - 1)))


def flat_norm(a: Tensor) -> Tensor:
    return a.flatten(1).norm(dim=1).reshape(-1, *([1] * (a.ndim - 1)))


def scale_at(scale: float | Callable[[float], float], t: float) -> float:
    return float(scale(t)) if callable(scale) else float(scale)


def check_scale(name: str, scale: Any) -> float | Callable[[float], float]:
    if callable(scale):
        return scale
    return check_range(name, scale)


def check_formulation(value: Any) -> str:
    return check_choice("formulation", value, FORMULATIONS)


def check_threshold(name: str, value: Any) -> float:
    """A norm threshold: ``None`` or ``inf`` = off, else > 0."""
    if value is None:
        return math.inf
    return check_range(name, value, 0.0, low_open=True)


def nonfinite_policy(value: Any, allowed: tuple[str, ...] = ("raise", "skip", "ignore"), where: str = "") -> str:
    """Validate ``on_nonfinite`` for a guidance stage (gradkit's one vocabulary; ``"worst"`` only for populations)."""
    return check_nonfinite(value, allowed, where=where)
