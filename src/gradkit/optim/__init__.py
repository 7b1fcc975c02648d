"""Optimizers: ``torch.optim.Optimizer`` subclasses on gradkit's shared kernel layer."""

from ._base import ElementwiseOptimizer, Optimizer
from .adam import Adam, AdamW
from .ademamix import AdEMAMix
from .diffgrad import DiffGrad
from .lion import Lion

__all__ = ["AdEMAMix", "Adam", "AdamW", "DiffGrad", "ElementwiseOptimizer", "Lion", "Optimizer"]
