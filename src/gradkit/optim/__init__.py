"""Optimizers: ``torch.optim.Optimizer`` subclasses on gradkit's shared kernel layer."""

from ._base import ElementwiseOptimizer, Optimizer
from .adahessian import AdaHessian
from .adam import Adam, AdamW
from .ademamix import AdEMAMix
from .dadaptation import DAdaptAdam, DAdaptSGD
from .diffgrad import DiffGrad
from .dog import DoG, LDoG, PolynomialDecayAverager
from .frugal import FRUGAL
from .gravity import Gravity
from .lion import Lion
from .mars import MARS
from .muon import Muon
from .prodigy import Prodigy
from .schedulefree import ScheduleFreeAdamW, ScheduleFreeSGD

__all__ = [
    "AdaHessian",
    "AdEMAMix",
    "Adam",
    "AdamW",
    "DAdaptAdam",
    "DAdaptSGD",
    "DiffGrad",
    "DoG",
    "ElementwiseOptimizer",
    "FRUGAL",
    "Gravity",
    "LDoG",
    "Lion",
    "MARS",
    "Muon",
    "Optimizer",
    "PolynomialDecayAverager",
    "Prodigy",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
]
