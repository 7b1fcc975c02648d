"""gradkit.guide with diffusers: its flow-matching networks in gradkit's sampler, gradkit's rules as diffusers guiders.

Optional extra: ``pip install "gradkit[diffusers]"`` (pins ``diffusers==0.42.*``: the ``diffusers.guiders`` API is
marked experimental upstream). Nothing in the core imports this module.

Convention mapping (GUIDE.md §0). diffusers' flow-matching pipelines (SD3, Flux, Wan) use ``σ = 1 − t``, the state
``z = (1 − σ)·data + σ·noise`` (the same point as gradkit's ``x_t``), a network input ``timestep = σ·1000``
(``σ`` for Flux, which divides by 1000 itself) and a network output ``u = noise − data = −v``;
``FlowMatchEulerDiscreteScheduler.step`` is ``z ← z + (σ′ − σ)·u``, i.e. one Euler step of gradkit's sampler on
the grid ``t = 1 − scheduler.sigmas``. :class:`DiffusersFlowModel` wraps such a network as a gradkit velocity model
and :func:`flow_times` reads the grid from a scheduler, so :func:`gradkit.guide.sample` reproduces the diffusers
loop and can run every gradkit guidance method on it (CFG++, TFG, FlowChef and the particle methods need gradkit's
own loop: diffusers' ``callback_on_step_end`` cannot change the rule).

:class:`GradkitGuider` runs a gradkit pointwise rule (:class:`~gradkit.guide.CFG`, :class:`~gradkit.guide.CFGZeroStar`,
:class:`~gradkit.guide.APG` with ``space="native"``, :class:`~gradkit.guide.AdaptiveGuidance`, optionally inside a
:class:`~gradkit.guide.GuidanceInterval`) as a ``diffusers.guiders.BaseGuidance`` for the modular pipelines. A
guider sees only the network's predictions (ε, or u = −v for flow models), not the latents, so rules act in the
native space; CFG, CFG-Zero* and APG are odd under a sign flip of both predictions, so on ``u = −v`` they give
exactly the negated velocity rule. Parity with diffusers' own ``ClassifierFreeGuidance``,
``ClassifierFreeZeroStarGuidance`` and ``AdaptiveProjectedGuidance`` on the same predictions is tested
(``tests/guide/test_diffusers.py``): gradkit ``APG(w, formulation="diffusers", space="native")`` ≡ diffusers'
default APG at ``guidance_scale = w``; gradkit's paper form ≡ diffusers ``use_original_formulation=True`` at
``guidance_scale = w − 1``; gradkit's ``norm_threshold=None`` ≡ diffusers' ``adaptive_projected_guidance_rescale=0``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

try:
    import diffusers  # noqa: F401
    from diffusers.configuration_utils import register_to_config
    from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
except ModuleNotFoundError as exc:  # pragma: no cover - exercised in tests/integrations/test_optional.py style
    raise ModuleNotFoundError(
        f"gradkit.integrations.diffusers needs diffusers ({exc.name} is missing): pip install \"gradkit[diffusers]\"",
        name=exc.name) from exc

from ..guide import APG, CFG, AdaptiveGuidance, CFGZeroStar, Guidance, GuidanceInterval

Tensor = torch.Tensor

__all__ = ["DiffusersFlowModel", "GradkitGuider", "flow_times"]


class DiffusersFlowModel:
    """A diffusers flow-matching network (SD3 / Flux / Wan transformer, a UNet) as a gradkit velocity model.

    Args:
        network: the denoiser; called as ``network(z, timestep=σ·time_scale, **kwargs, return_dict=False)[0]``
            and returning ``u = noise − data``.
        time_scale: the factor from σ to the network's ``timestep`` (default 1000.0, SD3 / Wan / scheduler
            ``num_train_timesteps``; Flux pipelines pass σ itself: 1.0).
        **forward_kwargs: keyword arguments passed on every call (e.g. ``joint_attention_kwargs``).

    The condition given to :func:`gradkit.guide.sample` (and to the rules' ``uncond``) is a ``dict`` of extra
    network arguments, e.g. ``{"encoder_hidden_states": e, "pooled_projections": p}``; ``None`` adds nothing.
    """

    prediction = "velocity"

    def __init__(self, network: torch.nn.Module, *, time_scale: float = 1000.0, **forward_kwargs: Any):
        if not callable(network):
            raise ValueError(f"network must be callable, got {type(network).__name__}")
        self.network = network
        self.time_scale = float(time_scale)
        self.forward_kwargs = forward_kwargs
        params = inspect.signature(network.forward if hasattr(network, "forward") else network).parameters
        self._accepts_return_dict = "return_dict" in params

    def __call__(self, x: Tensor, t: Tensor, cond: dict[str, Any] | None = None) -> Tensor:
        if cond is not None and not isinstance(cond, dict):
            raise ValueError(f"cond must be a dict of network keyword arguments or None, got {type(cond).__name__}")
        kwargs = dict(self.forward_kwargs)
        kwargs.update(cond or {})
        if self._accepts_return_dict:
            kwargs["return_dict"] = False
        dtype = next(self.network.parameters()).dtype if isinstance(self.network, torch.nn.Module) else x.dtype
        timestep = ((1.0 - t) * self.time_scale).to(dtype)
        out = self.network(x.to(dtype), timestep=timestep, **kwargs)
        u = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        return -u.to(x.dtype)


def flow_times(scheduler: Any, num_inference_steps: int | None = None, **set_timesteps_kwargs: Any) -> Tensor:
    """The time grid ``t = 1 − σ`` (float64, increasing, ``N + 1`` points) of a flow-matching scheduler.

    Args:
        scheduler: a diffusers flow-matching scheduler (e.g. ``FlowMatchEulerDiscreteScheduler``); its
            ``set_timesteps`` is called when ``num_inference_steps`` or other keywords are given.
        num_inference_steps: number of steps N (default: keep the scheduler's current schedule).
        **set_timesteps_kwargs: further arguments of ``set_timesteps`` (``sigmas``, ``mu``, …).
    """
    if num_inference_steps is not None or set_timesteps_kwargs:
        scheduler.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
    sigmas = torch.as_tensor(scheduler.sigmas, dtype=torch.float64).flatten().cpu()
    return 1.0 - sigmas


_POINTWISE = (CFG, CFGZeroStar, APG, AdaptiveGuidance)


class GradkitGuider(BaseGuidance):
    """A gradkit pointwise rule as a diffusers guider (``diffusers.guiders.BaseGuidance``, experimental upstream).

    Args:
        rule: a :class:`~gradkit.guide.CFG`, :class:`~gradkit.guide.CFGZeroStar`, :class:`~gradkit.guide.APG`
            (``space="native"``) or :class:`~gradkit.guide.AdaptiveGuidance`, optionally wrapped in a
            :class:`~gradkit.guide.GuidanceInterval` (with ``unit="sigma"`` the σ comes from the pipeline's
            ``timestep / 1000``).
        start: fraction of the steps after which guidance starts (diffusers' meaning; default 0.0).
        stop: fraction of the steps after which guidance stops (default 1.0).
        enabled: whether guidance is on (default True).

    The rule's state (APG momentum, the adaptive switch) is reset at step 0. During CFG-Zero*'s zero-init steps
    only the conditional prediction is requested (diffusers' own guider still requests both).
    :class:`AdaptiveGuidance` switches for the whole batch here (a guider's batch is one network call) once every
    sample agrees, after which the pipeline stops computing the unconditional prediction. The config holds a Python
    object: build the guider in code (``save_pretrained`` cannot serialise it).
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(self, rule: Guidance, start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        super().__init__(start, stop, enabled)
        inner = rule.rule if isinstance(rule, GuidanceInterval) else rule
        if not isinstance(inner, _POINTWISE):
            raise ValueError("rule must be CFG, CFGZeroStar, APG, AdaptiveGuidance or a GuidanceInterval of one, "
                             f"got {type(inner).__name__}")
        if isinstance(inner, APG) and inner.space != "native":
            raise ValueError("a guider sees predictions only (no latents): use APG(..., space='native')")
        self.rule = rule
        self.inner = inner
        self._all_switched = False

    def _t(self) -> float:
        if self._timestep is None:
            return 0.0
        ts = float(torch.as_tensor(self._timestep).flatten()[0])
        return 1.0 - ts / 1000.0

    def _is_guided(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is not None:
            lo, hi = int(self._start * self._num_inference_steps), int(self._stop * self._num_inference_steps)
            if not (lo <= self._step < hi):
                return False
            if isinstance(self.rule, GuidanceInterval) and not self.rule.active(self._step, self._num_inference_steps,
                                                                                self._t()):
                return False
        if isinstance(self.inner, CFGZeroStar) and self._step is not None and self._step < self.inner.zero_init_steps:
            return False
        return not (isinstance(self.inner, AdaptiveGuidance) and self._all_switched)

    def _reset_if_first(self) -> None:
        if self._step == 0:
            if isinstance(self.inner, APG):
                self.inner.buffer = None
            self._all_switched = False

    def prepare_inputs(self, data: dict[str, tuple[Tensor, Tensor]]) -> list:
        self._reset_if_first()
        idx = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch(data, i, name) for i, name in zip(idx, self._input_predictions)]

    def prepare_inputs_from_block_state(self, data: Any, input_fields: dict[str, str | tuple[str, str]]) -> list:
        self._reset_if_first()
        idx = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch_from_block_state(input_fields, data, i, name)
                for i, name in zip(idx, self._input_predictions)]

    def forward(self, pred_cond: Tensor, pred_uncond: Tensor | None = None) -> GuiderOutput:
        step = self._step
        if isinstance(self.inner, CFGZeroStar) and step is not None and step < self.inner.zero_init_steps:
            pred = torch.zeros_like(pred_cond)
        elif not self._is_guided() or pred_uncond is None:
            pred = pred_cond
        else:
            t = self._t()
            if isinstance(self.inner, AdaptiveGuidance):
                a, b = pred_cond.flatten(1), pred_uncond.flatten(1)
                cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).clamp(-1, 1)
                pred = CFG(self.inner.scale, formulation=self.inner.formulation).combine(pred_cond, pred_uncond, t=t)
                self._all_switched = bool((cos > self.inner.threshold).all())
            else:
                pred = self.inner.combine(pred_cond, pred_uncond, t=t)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    @property
    def num_conditions(self) -> int:
        return 2 if self._is_guided() else 1

