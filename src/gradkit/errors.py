"""Errors gradkit raises on purpose."""

from __future__ import annotations

__all__ = ["NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """A loss, gradient or fitness value was NaN or infinite; nothing was updated."""
