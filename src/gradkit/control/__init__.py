"""Training controllers: freezing, early stopping, monitoring."""

from .base import Controller
from .early_stopping import EarlyStopping
from .grades import GradES

__all__ = ["Controller", "EarlyStopping", "GradES"]
