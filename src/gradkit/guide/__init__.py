"""Guided sampling: steer a flow-matching / diffusion sampler at inference time with exact, estimated or no gradients.

One convention: the linear path ``x_t = (1−t)·x0 + t·x1`` (t = 0 noise → 1 data), velocity prediction; a model is
any callable ``(x, t, cond) -> prediction`` with a declared parameterisation (:class:`FlowModel`), and
:func:`sample` integrates it (Euler, midpoint, Heun, RK4, or the marginal-preserving SDE). Guidance plugs in at three
levels (:class:`Guidance`): *rules* combining per-step predictions (CFG, CFG-Zero*, APG, GFCG, classifier guidance,
interval / adaptive schedules, Autoguidance), *steps* that need the sampler (CFG++, TFG / DPS / FreeDoM / MPGD,
FlowChef), and *populations* (the ``after_step`` hook; particle methods build on it). A reward or classifier
gradient comes from any ``gk.sources`` source: ``Backprop`` by default, ``SPSA`` / ``ES`` / ``ForwardGradient`` for a
black box. :mod:`gradkit.guide.toy` is the exact Gaussian-mixture test-bed.
"""

from . import toy
from .adaptive_guidance import AdaptiveGuidance
from .apg import APG
from .autoguidance import Autoguidance
from .base import SAME, Conditional, Guidance, StepContext, Unconditional
from .cfg import CFG, cfg
from .cfg_plus_plus import CFGPlusPlus
from .cfg_zero_star import CFGZeroStar, optimized_scale
from .classifier_guidance import ClassifierGuidance
from .elucd import EluCD, relu_to_softplus
from .flowchef import FlowChef
from .gfcg import GFCG
from .interval import GuidanceInterval
from .model import FlowModel, as_flow_model, vp_cosine_time, vp_discrete_time
from .sampler import METHODS, SampleOutput, Sampler, context, flow_map, guided_velocity, sample, time_grid
from .tfg import DPS, MPGD, TFG, FreeDoM

__all__ = [
    "APG", "CFG", "DPS", "GFCG", "METHODS", "MPGD", "SAME", "TFG", "AdaptiveGuidance", "Autoguidance", "CFGPlusPlus",
    "CFGZeroStar", "ClassifierGuidance", "Conditional", "EluCD", "FlowChef", "FlowModel", "FreeDoM", "Guidance",
    "GuidanceInterval", "SampleOutput", "Sampler", "StepContext", "Unconditional", "as_flow_model", "cfg", "context",
    "flow_map", "guided_velocity",
    "optimized_scale", "relu_to_softplus", "sample", "time_grid", "toy", "vp_cosine_time", "vp_discrete_time",
]
