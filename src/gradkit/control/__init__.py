"""Training controllers: freezing, early stopping, monitoring."""

from .base import Controller

__all__ = ["Controller"]
