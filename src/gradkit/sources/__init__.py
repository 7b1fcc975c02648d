"""Gradient sources: how a descent direction is obtained (exact, estimated, or from function values)."""

from .backprop import Backprop
from .base import Closure, Source, check_loss, trainable_params
from .diagnostics import Comparison, compare
from .es import ES
from .forward_gradient import ForwardGradient
from .likelihood_ratio import LikelihoodRatio
from .spsa import SPSA
from .zeroth_order import ZerothOrder
from .zosgd import ZOSGD

__all__ = ["ES", "SPSA", "ZOSGD", "Backprop", "Closure", "Comparison", "ForwardGradient", "LikelihoodRatio",
           "Source", "ZerothOrder", "check_loss", "compare",
           "trainable_params"]
