"""Gradient transforms: clipping, filtering and statistics applied to ``.grad`` in place."""

from .base import Transform, grads_of

__all__ = ["Transform", "grads_of"]
