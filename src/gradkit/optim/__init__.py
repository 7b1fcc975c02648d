"""Optimizers: ``torch.optim.Optimizer`` subclasses on gradkit's shared kernel layer."""

from ._base import ElementwiseOptimizer, Optimizer
from .adahessian import AdaHessian
from .adam import Adam, AdamW
from .ademamix import AdEMAMix
from .diffgrad import DiffGrad
from .gravity import Gravity
from .lion import Lion
from .mars import MARS
from .muon import Muon

__all__ = [
    "AdaHessian",
    "AdEMAMix",
    "Adam",
    "AdamW",
    "DiffGrad",
    "ElementwiseOptimizer",
    "Gravity",
    "Lion",
    "MARS",
    "Muon",
    "Optimizer",
]
