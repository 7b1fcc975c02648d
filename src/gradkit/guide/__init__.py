"""Guided sampling: steer a flow-matching / diffusion sampler at inference time with exact, estimated or no gradients.

One convention: the linear path ``x_t = (1−t)·x0 + t·x1`` (t = 0 noise → 1 data), velocity prediction; a model is
any callable ``(x, t, cond) -> prediction`` with a declared parameterisation (:class:`FlowModel`), and
:func:`sample` integrates it (Euler, midpoint, Heun, RK4, or the marginal-preserving SDE). Guidance plugs in at three
levels (:class:`Guidance`): *rules* combining per-step predictions (CFG, CFG-Zero*, APG, GFCG, classifier guidance,
interval / adaptive schedules, Autoguidance), *steps* that need the sampler (CFG++, TFG / DPS / FreeDoM / MPGD,
FlowChef), and *populations* (the ``after_step`` hook: best-of-N, FK steering, FK correctors, look-ahead
search), plus input optimisation outside the loop (D-Flow, FlowOpt, noise search with ``gk.sources`` /
``gk.search``). A reward or classifier
gradient comes from any ``gk.sources`` source: ``Backprop`` by default, ``SPSA`` / ``ES`` / ``ForwardGradient`` for a
black box. :mod:`gradkit.guide.toy` is the exact Gaussian-mixture test-bed.
"""

from . import toy
from ._inputs import InputOptResult
from ._population import PopulationOutput, effective_sample_size, resample
from .adaptive_guidance import AdaptiveGuidance
from .apg import APG
from .autoguidance import Autoguidance
from .base import SAME, Composite, Conditional, Guidance, StepContext, Unconditional
from .best_of_n import BestOfN
from .cfg import CFG, cfg
from .cfg_plus_plus import CFGPlusPlus
from .cfg_zero_star import CFGZeroStar, optimized_scale
from .classifier_guidance import ClassifierGuidance
from .dflow import DFlow, chi_regularizer
from .elucd import EluCD, relu_to_softplus
from .fk_correctors import FKCorrector
from .fk_steering import FKSteering
from .flowchef import FlowChef
from .flowopt import FlowOpt
from .gfcg import GFCG
from .interval import GuidanceInterval
from .lookahead_search import CoDe, Free2Guide, LookAheadSearch
from .model import FlowModel, as_flow_model, vp_cosine_time, vp_discrete_time
from .noise_search import NoiseSearch
from .sampler import METHODS, SampleOutput, Sampler, context, flow_map, guided_velocity, sample, time_grid
from .tfg import DPS, MPGD, TFG, FreeDoM

__all__ = [
    "APG", "CFG", "DPS", "GFCG", "METHODS", "MPGD", "SAME", "TFG", "AdaptiveGuidance", "Autoguidance", "CFGPlusPlus",
    "CFGZeroStar", "ClassifierGuidance", "Composite", "Conditional", "EluCD", "FlowChef", "FlowModel", "FreeDoM",
    "Guidance",
    "GuidanceInterval", "SampleOutput", "Sampler", "StepContext", "Unconditional", "as_flow_model", "cfg", "context",
    "flow_map", "guided_velocity",
    # part 2: populations and input optimisation
    "BestOfN", "CoDe", "DFlow", "FKCorrector", "FKSteering", "FlowOpt", "Free2Guide", "InputOptResult",
    "LookAheadSearch", "NoiseSearch", "PopulationOutput", "chi_regularizer", "effective_sample_size", "resample",
    "optimized_scale", "relu_to_softplus", "sample", "time_grid", "toy", "vp_cosine_time", "vp_discrete_time",
]
