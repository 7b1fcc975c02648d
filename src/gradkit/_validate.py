"""Argument checks that raise ``ValueError`` naming the argument and the allowed range."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: The one vocabulary of every stage's ``on_nonfinite`` (README, "Non-finite values"):
#: raise = :class:`~gradkit.NonFiniteError`, nothing changed; skip = nothing changed, the event counted;
#: worst = population stages only, non-finite members rank last; ignore = no check at all (no cost).
NONFINITE_POLICIES = ("raise", "skip", "worst", "ignore")
#: What a stage that is not a population (optimizers, Pipeline, single-estimate sources) can honour.
NONFINITE_SINGLE = ("raise", "skip", "ignore")


def _num(name: str, value: Any, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import torch

            if isinstance(value, torch.Tensor) and value.numel() == 1:
                return _num(name, float(value), allow_inf)
        except ImportError:  # pragma: no cover
            pass
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a real number, got nan")
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, allow_inf: bool = False) -> float:
    """Check ``low <=/< value <=/< high``; return ``value`` as float.

    NaN is always refused; ±inf too unless ``allow_inf`` (for an argument where infinity means "no limit").
    """
    v = _num(name, value, allow_inf)
    bad_low = low is not None and (v <= low if low_open else v < low)
    bad_high = high is not None and (v >= high if high_open else v > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return v


def check_nonneg(name: str, value: Any, allow_inf: bool = False) -> float:
    return check_range(name, value, 0.0, allow_inf=allow_inf)


def check_positive(name: str, value: Any, allow_inf: bool = False) -> float:
    return check_range(name, value, 0.0, low_open=True, allow_inf=allow_inf)


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


def check_nonfinite(value: Any, allowed: Sequence[str] = NONFINITE_SINGLE, *, where: str = "") -> str:
    """Validate an ``on_nonfinite`` policy at construction; returns it.

    ``allowed`` is the subset of :data:`NONFINITE_POLICIES` the stage can honour (default: every value but
    ``"worst"``, which only population stages can give a meaning). A word outside the vocabulary raises
    ``ValueError`` listing the vocabulary; a word of the vocabulary the stage cannot honour raises ``ValueError``
    saying so and listing what the stage accepts. ``where`` names the stage in the message (e.g. ``"AdamW"``).
    """
    unknown = [a for a in allowed if a not in NONFINITE_POLICIES]
    if unknown:
        raise ValueError(f"allowed must be a subset of {NONFINITE_POLICIES}, got {unknown}")
    if not isinstance(value, str) or value not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite must be one of {tuple(allowed)}, got {value!r}")
    if value not in allowed:
        at = f" by {where}" if where else " by this stage"
        raise ValueError(f"on_nonfinite={value!r} cannot be honoured{at}; it accepts one of {tuple(allowed)}")
    return value
