"""Gradient sources: how a descent direction is obtained (exact, estimated, or from function values)."""

from ._local import LocalRule, as_blocks
from .backprop import Backprop
from .base import Closure, Source, check_loss, trainable_params
from .diagnostics import Comparison, compare
from .es import ES
from .feedback_alignment import FeedbackAlignment
from .forward_forward import ForwardForward
from .forward_gradient import ForwardGradient
from .likelihood_ratio import LikelihoodRatio
from .mono_forward import MonoForward
from .noprop import NoProp
from .spsa import SPSA
from .zeroth_order import ZerothOrder
from .zosgd import ZOSGD

__all__ = ["ES", "SPSA", "ZOSGD", "Backprop", "Closure", "Comparison", "FeedbackAlignment", "ForwardForward",
           "ForwardGradient", "LikelihoodRatio", "LocalRule", "MonoForward", "NoProp", "Source", "ZerothOrder",
           "as_blocks", "check_loss", "compare", "trainable_params"]
