"""GradES: freeze each weight matrix once its gradient has converged.

Paper: "GradES: Significantly Faster Training in Transformers with Gradient-Based Early Stopping" (Wen et al., 2025).
Rule: after a grace period, matrix W stops training once s(∇W) = ‖∇W‖₁ (element-wise L1 norm, the paper's
statistic) stays below τ; training stops when every tracked matrix is frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._validate import check_beta, check_choice, check_int, check_positive
from .base import Controller

__all__ = ["GradES"]

Targets = str | Iterable[str] | Callable[[str, torch.Tensor], bool]


class GradES(Controller):
    """Per-matrix gradient-based early stopping.

    Statistic (``statistic="l1"``, the paper's): the element-wise L1 norm ‖∇W‖₁ = Σ|∂L/∂w| of each tracked
    matrix's gradient as produced by backpropagation, i.e. *before* any transform such as clipping.
    ``statistic="mean_abs"`` divides by the number of elements, so one ``tau`` suits matrices of every size.
    A matrix is frozen when its statistic has been below ``tau`` for ``patience`` consecutive steps, counting
    only steps after ``warmup_steps`` (the paper's grace period). ``smoothing=β > 0`` compares an EMA of the
    statistic (β·previous + (1−β)·current) instead of the raw value, so that mini-batch noise does not keep
    resetting the patience counter (0, the default, is the paper's raw rule). Freezing calls
    ``requires_grad_(False)`` and sets ``.grad = None``, so backward no longer computes it and every gradkit/torch
    optimizer skips it (no update, no weight decay, no state change). With ``optimizer=``, the matrix's optimizer
    state is also dropped to free memory: a frozen matrix never trains again in this run, and a checkpoint
    simply omits its state.
    ``should_stop`` becomes True when all tracked matrices are frozen (other parameters, e.g. biases and norms,
    train until then, as in the paper).

    ``targets``: ``"matrices"`` (every parameter with ``ndim >= 2``, the default), ``"all"``, an iterable of
    parameter names, or a predicate ``(name, param) -> bool``.

    How gradients are observed: by default a gradient hook on each tracked parameter records the statistic
    whenever autograd computes that parameter's gradient (``loss.backward()`` or ``torch.autograd.grad``, so
    :class:`~gradkit.sources.Backprop` and plain loops both work). With gradient accumulation over several
    backward passes per step the per-pass statistics are summed: for the L1 norm an upper bound of the
    accumulated gradient's, equal to it with one backward per step.
    Sources that write ``.grad`` without autograd (zeroth-order, ES) need ``observe="transform"``: then also put
    the same object in the Pipeline's ``transforms`` (it reads ``.grad`` there, unchanged, with one fused
    foreach L1-norm pass).

    Statistics: :attr:`frozen_fraction` (by parameter count), :attr:`frozen` (names), :meth:`stats`.

    Args:
        model: the module whose matrices are tracked.
        tau: τ, the threshold below which a matrix's statistic counts as converged (> 0).
        patience: the number of consecutive steps below τ before a matrix is frozen. Default 1.
        warmup_steps: the grace period: steps during which nothing is frozen. Default 0.
        targets: ``'matrices'`` (default), ``'all'``, an iterable of parameter names, or a predicate (name, param) ->
            bool.
        statistic: ``'l1'`` (‖∇W‖₁, the paper's) or ``'mean_abs'`` (divided by the number of elements). Default 'l1'.
        smoothing: β of an EMA of the statistic (0: the raw statistic, as the paper). Default 0.
        optimizer: if given, a frozen matrix's optimizer state is dropped to free memory. Default None.
        observe: ``'backward'`` (autograd hooks, default) or ``'transform'`` (read .grad as a Pipeline transform).
    """

    paper = "GradES: Significantly Faster Training in Transformers with Gradient-Based Early Stopping"

    def __init__(self, model: nn.Module, tau: float, *, patience: int = 1, warmup_steps: int = 0,
                 targets: Targets = "matrices", statistic: str = "l1", smoothing: float = 0.0,
                 optimizer: torch.optim.Optimizer | None = None, observe: str = "backward"):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.tau = check_positive("tau", tau)
        self.patience = check_int("patience", patience, 1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.statistic = check_choice("statistic", statistic, ("l1", "mean_abs"))
        self.smoothing = check_beta("smoothing", smoothing)
        self.observe = check_choice("observe", observe, ("backward", "transform"))
        self.optimizer = optimizer
        self.named = self._select(model, targets)
        if not self.named:
            raise ValueError(f"targets={targets!r} selects no trainable parameter of the model")
        self.steps = 0
        self.below = {n: 0 for n in self.named}
        self.frozen: dict[str, int] = {}  # name -> step at which it was frozen
        self.last: dict[str, float] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._hooks: dict[str, Any] = {}
        self._register_hooks()
        self.total_numel = sum(p.numel() for p in self.named.values())

    def _register_hooks(self) -> None:
        if self.observe == "backward":
            for n, p in self.named.items():
                if n not in self.frozen:
                    self._hooks[n] = p.register_hook(self._make_hook(n))

    # -- copies: the hooks belong to the parameters of this copy, so they are registered again ----------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_hooks"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._register_hooks()

    @property
    def needs_backward(self) -> bool:  # type: ignore[override]
        return self.observe == "backward"

    @property
    def needs_transform(self) -> bool:  # type: ignore[override]
        return self.observe == "transform"

    #: As a transform it only reads ``.grad``.
    keeps_finite = True

    @staticmethod
    def _select(model: nn.Module, targets: Targets) -> dict[str, torch.Tensor]:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if isinstance(targets, str):
            check_choice("targets", targets, ("matrices", "all"))
            keep = (lambda n, p: p.ndim >= 2) if targets == "matrices" else (lambda n, p: True)
        elif callable(targets):
            keep = targets
        else:
            names = set(targets)
            unknown = names - {n for n, _ in params}
            if unknown:
                raise ValueError(f"targets names no trainable parameter: {sorted(unknown)}")
            keep = lambda n, p: n in names  # noqa: E731
        return {n: p for n, p in params if keep(n, p)}

    def _measure(self, g: torch.Tensor) -> torch.Tensor:
        s = torch.linalg.vector_norm(g.detach(), 1)
        return s / g.numel() if self.statistic == "mean_abs" else s

    def _make_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            s = self._measure(grad)
            prev = self._pending.get(name)
            self._pending[name] = s if prev is None else prev + s
        return hook

    # -- observe="transform" ------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, params: Iterable[torch.Tensor] | None = None) -> dict[str, Any]:
        """Record the statistic from ``.grad`` of the tracked matrices (``observe="transform"``); no edit."""
        live = [(n, p) for n, p in self.named.items() if n not in self.frozen and p.grad is not None]
        if not live:
            return {}
        grads = [p.grad for _, p in live]
        norms = torch._foreach_norm(grads, 1)
        for (n, p), s in zip(live, norms):
            self._pending[n] = s / p.numel() if self.statistic == "mean_abs" else s
        return {}

    # -- controller ---------------------------------------------------------------------------------
    def after_step(self, loss: torch.Tensor | float) -> None:
        self.steps += 1
        live = [n for n in self.named if n not in self.frozen]
        seen = [n for n in live if n in self._pending]
        if live and not seen:
            raise RuntimeError("GradES saw no gradient of any tracked matrix this step: with a source that writes "
                               ".grad directly use GradES(..., observe='transform') and add it to the transforms")
        values = torch.stack([self._pending[n].float() for n in seen]).tolist() if seen else []
        self._pending.clear()
        for n, v in zip(seen, values):
            if self.smoothing and n in self.last:
                v = self.smoothing * self.last[n] + (1 - self.smoothing) * v
            self.last[n] = v
            if self.steps <= self.warmup_steps:
                continue
            self.below[n] = self.below[n] + 1 if v < self.tau else 0
            if self.below[n] >= self.patience:
                self._freeze(n)

    def _freeze(self, name: str) -> None:
        p = self.named[name]
        p.requires_grad_(False)
        p.grad = None
        self.frozen[name] = self.steps
        hook = self._hooks.pop(name, None)
        if hook is not None:
            hook.remove()
        if self.optimizer is not None:
            self.optimizer.state.pop(p, None)

    @property
    def should_stop(self) -> bool:  # type: ignore[override]
        return len(self.frozen) == len(self.named)

    @property
    def frozen_fraction(self) -> float:
        """Fraction of the tracked parameters' elements that are frozen."""
        return sum(self.named[n].numel() for n in self.frozen) / self.total_numel

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {"frozen_fraction": self.frozen_fraction, "frozen_matrices": float(len(self.frozen))}
        out.update({f"grad_{self.statistic}/{n}": v for n, v in self.last.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "below": dict(self.below), "frozen": dict(self.frozen), "last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state["frozen"]) - set(self.named)
        if unknown:
            raise ValueError(f"state_dict names matrices this GradES does not track: {sorted(unknown)}")
        self.steps = int(state["steps"])
        self.below = {n: int(state["below"].get(n, 0)) for n in self.named}
        self.last = dict(state["last"])
        self.frozen = {}
        for n, step in state["frozen"].items():
            self._freeze(n)
            self.frozen[n] = int(step)

    def close(self) -> None:
        """Remove the gradient hooks (frozen matrices stay frozen)."""
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()

    def __repr__(self) -> str:
        return (f"GradES(tau={self.tau}, patience={self.patience}, warmup_steps={self.warmup_steps}, "
                f"statistic={self.statistic!r}, tracked={len(self.named)}, frozen={len(self.frozen)})")
