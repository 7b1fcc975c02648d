"""The base every gradkit optimizer shares: kernel choice, hyper-parameter checks, non-finite policy.

A gradkit optimizer is a plain ``torch.optim.Optimizer``: param groups, per-group hyper-parameters,
``state_dict``/``load_state_dict``, LR schedulers and ``zero_grad`` behave as in torch. On top it adds

* ``kernel=``: ``"auto" | "compiled" | "foreach" | "loop"`` (see :mod:`gradkit._kernels`);
* ``on_nonfinite=``: ``"ignore"`` (torch's behaviour, the default: no check, no cost), ``"raise"``
  (:class:`~gradkit.NonFiniteError` before anything changes) or ``"skip"`` (the step is skipped, parameters
  and state untouched, ``nonfinite_skips`` counts it);
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
from .._validate import check_nonfinite
from ..errors import NonFiniteError

__all__ = ["ElementwiseOptimizer", "Optimizer", "decay_scalars"]

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class Optimizer(torch.optim.Optimizer):
    """Base class of gradkit optimizers (a ``torch.optim.Optimizer``)."""

    #: Title of the paper that introduced the method (shown by ``gradkit list``).
    paper: ClassVar[str] = ""

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, kernel: str = "auto",
                 on_nonfinite: str = "ignore"):
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
        state_dict = dict(state_dict)
        extra = state_dict.pop("gradkit", {})
        super().load_state_dict(state_dict)
        self.nonfinite_skips = int(extra.get("nonfinite_skips", 0))

    # -- step ----------------------------------------------------------------------------------------
    def _grads_ok(self, params: list[torch.Tensor]) -> bool:
        """Apply the non-finite policy; False means: skip this step."""
        if self.on_nonfinite == "ignore" or all_finite([p.grad for p in params]):
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
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if p.is_complex():
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
    """An optimizer whose update is one elementwise rule over (param, grad, *state buffers)."""

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """Names of the per-parameter state buffers (zeros-initialised, shaped like the parameter)."""
        raise NotImplementedError

    def _rule(self, group: dict[str, Any]) -> Elementwise:
        """The update rule for this group (a variant may depend on group flags such as ``amsgrad``)."""
        raise NotImplementedError

    def _scalars(self, group: dict[str, Any], step: int) -> dict[str, float]:
        """Scalars the rule needs at ``step`` (1-based), computed in double precision."""
        raise NotImplementedError

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
