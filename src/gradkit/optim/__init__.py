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
from .mfac import MFAC
from .muon import Muon
from .optimistic_amsgrad import OptimisticAMSGrad
from .prodigy import Prodigy
from .schedulefree import ScheduleFreeAdamW, ScheduleFreeSGD

__all__ = [
    "available",
    "capabilities",
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
    "MFAC",
    "Muon",
    "OptimisticAMSGrad",
    "Optimizer",
    "PolynomialDecayAverager",
    "Prodigy",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
]


def available() -> dict[str, type[Optimizer]]:
    """Every concrete gradkit optimizer class, by name (what the tests, benchmarks and DDP checks iterate)."""
    out = {}
    for name in __all__:
        obj = globals().get(name)
        if isinstance(obj, type) and issubclass(obj, Optimizer) and obj not in (Optimizer, ElementwiseOptimizer):
            out[name] = obj
    return out


def capabilities() -> dict[str, dict[str, bool]]:
    """The capability table of every optimizer: ``{name: {"needs_graph", "supports_complex", "supports_sparse"}}``.

    What each method can do, declared once on its class (see :class:`Optimizer`); the Pipeline checks
    ``needs_graph`` at construction and the generic tests feed every optimizer according to it.
    """
    keys = ("needs_graph", "supports_complex", "supports_sparse")
    return {name: {k: bool(getattr(cls, k)) for k in keys} for name, cls in available().items()}
