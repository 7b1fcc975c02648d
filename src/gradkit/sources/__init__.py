"""Gradient sources: how a descent direction is obtained (exact, estimated, or from function values)."""

from .backprop import Backprop
from .base import Closure, Source, check_loss, trainable_params

__all__ = ["Backprop", "Closure", "Source", "check_loss", "trainable_params"]
