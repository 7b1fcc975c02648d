"""Argument checks that raise ``ValueError`` naming the argument and the allowed range."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

NONFINITE_POLICIES = ("raise", "skip", "ignore")


def _num(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import torch

            if isinstance(value, torch.Tensor) and value.numel() == 1:
                return float(value)
        except ImportError:  # pragma: no cover
            pass
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a real number, got nan")
    return float(value)


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """Check ``low <=/< value <=/< high``; return ``value`` as float."""
    v = _num(name, value)
    bad_low = low is not None and (v <= low if low_open else v < low)
    bad_high = high is not None and (v >= high if high_open else v > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return v


def check_nonneg(name: str, value: Any) -> float:
    return check_range(name, value, 0.0)


def check_positive(name: str, value: Any) -> float:
    return check_range(name, value, 0.0, low_open=True)


def check_beta(name: str, value: Any) -> float:
    """A decay rate in [0, 1)."""
    return check_range(name, value, 0.0, 1.0, high_open=True)


def check_betas(name: str, betas: Any, n: int) -> tuple[float, ...]:
    if not isinstance(betas, Sequence) or len(betas) != n:
        raise ValueError(f"{name} must be a sequence of {n} numbers in [0, 1), got {betas!r}")
    return tuple(check_beta(f"{name}[{i}]", b) for i, b in enumerate(betas))


def check_int(name: str, value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_nonfinite(value: Any) -> str:
    return check_choice("on_nonfinite", value, NONFINITE_POLICIES)
