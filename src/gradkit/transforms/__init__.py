"""Gradient transforms: clipping, filtering and statistics applied to ``.grad`` in place."""

from .agc import AGC
from .autoclip import AutoClip
from .base import Transform, grads_of
from .clip_norm import ClipNorm, ClipValue
from .grad_stats import GradStats
from .grokfast import Grokfast
from .zclip import ZClip

__all__ = ["AGC", "AutoClip", "ClipNorm", "ClipValue", "GradStats", "Grokfast", "Transform", "ZClip", "grads_of"]
