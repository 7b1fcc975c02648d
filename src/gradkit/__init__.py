"""gradkit: train and steer PyTorch models with exact, estimated or no gradients.

One data path, every stage swappable::

    objective (closure) -> gk.sources -> gk.transforms -> gk.optim -> gk.control

See :class:`gradkit.Pipeline`.
"""

from . import control, guide, logging, optim, search, sources, transforms
from .errors import NonFiniteError
from .pipeline import Named, Pipeline, named

__version__ = "0.1.0"

__all__ = ["Named", "NonFiniteError", "Pipeline", "__version__", "control", "guide", "logging", "named", "optim",
           "search", "sources", "transforms"]
