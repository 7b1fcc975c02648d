"""The base every gradkit optimizer shares: kernel choice, hyper-parameter checks, non-finite policy.

A gradkit optimizer is a plain ``torch.optim.Optimizer``: param groups, per-group hyper-parameters,
``state_dict``/``load_state_dict``, LR schedulers and ``zero_grad`` behave as in torch. On top it adds

* ``kernel=``: ``"auto" | "compiled" | "foreach" | "loop"`` (see :mod:`gradkit._kernels`);
* ``on_nonfinite=``: ``"raise"`` (the default: :class:`~gradkit.NonFiniteError` before anything changes),
  ``"skip"`` (the step is skipped, parameters and state untouched, ``nonfinite_skips`` counts it) or
  ``"ignore"`` (torch's behaviour: no check, no cost). The check is one fused pass over the gradients and one
  host synchronisation; a :class:`gradkit.Pipeline` that has already checked them lets the step skip it;
* validation of hyper-parameters, both at construction and in ``add_param_group``.

Elementwise optimizers (Adam family, Lion, ...) subclass :class:`ElementwiseOptimizer` and provide an update
rule, the names of their state buffers and the per-step scalars; the base does state initialisation, step
counting and dispatch to the kernel.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from .._kernels import Elementwise, all_finite, resolve_kernel
from .._stateful import Copyable
from .._validate import check_nonfinite
from ..errors import NonFiniteError

__all__ = ["ElementwiseOptimizer", "Optimizer", "decay_scalars"]

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class Optimizer(Copyable, torch.optim.Optimizer):
    """Base class of gradkit optimizers (a ``torch.optim.Optimizer``).

    Copies (``copy.deepcopy``, ``pickle``) keep every attribute and step exactly as the original
    (:class:`gradkit._stateful.Copyable`).

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        defaults: the default hyper-parameters of every param group (checked by ``_check_group``).
        kernel: ``"auto"`` (default), ``"compiled"``, ``"foreach"`` or ``"loop"``: how the update runs (the three give
            the same numbers; see :mod:`gradkit._kernels`).
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"``: what a NaN/Inf gradient does (README,
            "Non-finite values").
    """

    #: Title of the paper that introduced the method (shown by ``gradkit list``).
    paper: ClassVar[str] = ""
    #: Set by a Pipeline for the duration of one ``step()`` when it has verified the gradients are finite.
    _grads_checked: bool = False

    # -- capabilities: what the method can do, read by Pipeline and by the generic tests (torch's optim_db in
    # spirit): tests feed each optimizer what its flags say instead of skipping classes by name.
    #: ``step()`` differentiates through ``p.grad``: gradients must come from ``backward(create_graph=True)``.
    needs_graph: ClassVar[bool] = False
    #: Complex parameters are supported (else ``step()`` raises ``RuntimeError``).
    supports_complex: ClassVar[bool] = False
    #: Sparse gradients are supported (else ``step()`` raises ``RuntimeError``).
    supports_sparse: ClassVar[bool] = False

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, kernel: str = "auto",
                 on_nonfinite: str = "raise"):
        self.on_nonfinite = check_nonfinite(on_nonfinite, where=type(self).__name__)
        self.kernel = resolve_kernel(kernel)
        self.nonfinite_skips = 0
        self._check_group(dict(defaults))
        super().__init__(params, defaults)

    # -- hyper-parameters ----------------------------------------------------------------------------
    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the first invalid hyper-parameter of ``group``."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    # -- state_dict: the skip counter travels with the state --------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["gradkit"] = {"nonfinite_skips": self.nonfinite_skips}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by this class, or by ``torch.optim`` (e.g. ``torch.optim.AdamW`` into ``AdamW``).

        A torch state is normalised: its ``step`` tensors become the integers gradkit counts with (otherwise every
        parameter would form its own step bucket), and torch's implementation flags (``foreach``, ``fused``,
        ``capturable``, ...) are dropped when neutral. A state this optimizer cannot use raises ``ValueError``
        before anything is loaded, naming what is missing (e.g. an AdamW state loaded into Prodigy lacks
        ``beta3``) or what would change the maths (``maximize=True``).
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("gradkit", {})
        state_dict["param_groups"] = [self._normalise_group(i, g) for i, g in enumerate(state_dict["param_groups"])]
        self._check_saved_state(state_dict)
        super().load_state_dict(state_dict)
        for st in self.state.values():
            step = st.get("step")
            if isinstance(step, torch.Tensor) and step.numel() == 1:
                st["step"] = int(step.item())
        self.nonfinite_skips = int(extra.get("nonfinite_skips", 0))

    #: Keys torch.optim stores in every param group: ``None`` = any value (an implementation choice, dropped);
    #: otherwise the only value gradkit can honour.
    _TORCH_GROUP_KEYS: ClassVar[dict[str, Any]] = {"foreach": None, "fused": None, "capturable": None,
                                                    "maximize": False, "differentiable": False}

    def _foreign_group_keys(self) -> dict[str, Any]:
        """Group keys of other libraries this class understands (see ``_TORCH_GROUP_KEYS``); extended per class."""
        return dict(self._TORCH_GROUP_KEYS)

    def _normalise_group(self, index: int, group: dict[str, Any]) -> dict[str, Any]:
        foreign = self._foreign_group_keys()
        group = dict(group)
        for key, needed in foreign.items():
            if key in group and key not in self.defaults:
                value = group.pop(key)
                if needed is not None and value != needed:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: param_groups[{index}] has "
                                     f"{key}={value!r}, which {type(self).__name__} cannot honour (only {needed!r})")
        missing = [k for k in self.defaults if k not in group and k not in foreign]
        if missing:
            raise ValueError(f"{type(self).__name__}.load_state_dict: param_groups[{index}] lacks the "
                             f"hyper-parameters {missing}: the state was saved by another optimizer")
        self._check_group(group)
        return group

    def _required_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """Keys every non-empty per-parameter state of ``group`` must hold (checked at load time)."""
        return ()

    def _check_saved_state(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("state", {})
        for i, group in enumerate(state_dict["param_groups"]):
            need = self._required_state_keys(group)
            for pid in group["params"]:
                st = saved.get(pid)
                missing = [k for k in need if st and k not in st]
                if missing:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: the state of parameter {pid} "
                                     f"(param_groups[{i}]) lacks {missing}: it was saved by another optimizer")

    # -- step ----------------------------------------------------------------------------------------
    def _grads_ok(self, params: list[torch.Tensor]) -> bool:
        """Apply the non-finite policy; False means: skip this step."""
        if self.on_nonfinite == "ignore" or self._grads_checked or all_finite([p.grad for p in params]):
            return True
        if self.on_nonfinite == "raise":
            raise NonFiniteError(
                f"{type(self).__name__}.step: a gradient is NaN or Inf; parameters and optimizer state are unchanged"
            )
        self.nonfinite_skips += 1
        return False

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse and not self.supports_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if p.is_complex() and not self.supports_complex:
                    raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
            active.append((group, params))
        if not self._grads_ok([p for _, ps in active for p in ps]):
            return loss
        self._step(active)
        return loss

    def _step(self, active: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        for group, params in active:
            if params:
                self._step_group(group, params)

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        raise NotImplementedError


class ElementwiseOptimizer(Optimizer):
    """An optimizer whose update is one elementwise rule over (param, grad, *state buffers).

    Args:
        params: the parameters to optimise: tensors, or param-group dicts whose keys override the defaults below.
        defaults: the default hyper-parameters of every param group.
        kernel: ``"auto"`` (default), ``"compiled"``, ``"foreach"`` or ``"loop"``: how the update runs (the three give
            the same numbers; see :mod:`gradkit._kernels`).
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"``: what a NaN/Inf gradient does (README,
            "Non-finite values").
    """

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """Names of the per-parameter state buffers (zeros-initialised, shaped like the parameter)."""
        raise NotImplementedError

    def _required_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("step", *self._state_keys(group))

    def _rule(self, group: dict[str, Any]) -> Elementwise:
        """The update rule for this group (a variant may depend on group flags such as ``amsgrad``)."""
        raise NotImplementedError

    def _scalars(self, group: dict[str, Any], step: int) -> dict[str, float]:
        """Scalars the rule needs at ``step`` (1-based), computed in double precision."""
        raise NotImplementedError

    def _fused(self, group: dict[str, Any], lists: list[list[torch.Tensor]], step: int) -> bool:
        """Under ``kernel="auto"``: run this step with a vendor-fused kernel (torch's) and return True, or
        return False having changed nothing (the rule then runs). Default: no fused kernel."""
        return False

    def _init_state(self, p: torch.Tensor, keys: tuple[str, ...]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
        for k in keys:
            if k not in state:
                state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        keys = self._state_keys(group)
        # Parameters that skipped steps (no grad) have a smaller step count: bucket by count so every
        # kernel call has uniform scalars. Normally there is one bucket.
        buckets: dict[int, list[torch.Tensor]] = {}
        for p in params:
            buckets.setdefault(self._init_state(p, keys)["step"], []).append(p)
        rule = self._rule(group)
        for step, ps in buckets.items():
            step += 1
            states = [self.state[p] for p in ps]
            for st in states:
                st["step"] = step
            lists = [ps, [p.grad for p in ps], *([st[k] for st in states] for k in keys)]
            if self.kernel == "auto" and self._fused(group, lists, step):
                continue
            rule(self.kernel, lists, self._scalars(group, step))


def decay_scalars(group: dict[str, Any]) -> dict[str, float]:
    """Weight-decay scalars in pytorch-optimizer's convention (``weight_decouple``, ``fixed_decay``).

    Decoupled: the rule multiplies p by ``decay`` = 1 − λ·lr (1 − λ with ``fixed_decay``). Coupled: the rule
    adds ``l2``·p to the gradient, without changing ``p.grad`` itself.
    """
    wd, lr = group["weight_decay"], group["lr"]
    if group["weight_decouple"]:
        return dict(decay=1.0 - wd * (1.0 if group["fixed_decay"] else lr), l2=0.0)
    return dict(decay=1.0, l2=wd)
