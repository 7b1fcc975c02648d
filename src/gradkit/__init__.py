"""gradkit: train and steer PyTorch models with exact, estimated or no gradients.

One data path, every stage swappable::

    objective (closure) -> gk.sources -> gk.transforms -> gk.optim -> gk.control

See :class:`gradkit.Pipeline`.
"""

from . import control, guide, optim, search, sources, transforms
from .errors import NonFiniteError
from .pipeline import Pipeline

__version__ = "0.1.0"

__all__ = ["NonFiniteError", "Pipeline", "__version__", "control", "guide", "optim", "search", "sources",
           "transforms"]
