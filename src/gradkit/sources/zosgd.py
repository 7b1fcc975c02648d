"""ZOSGD: zeroth-order SGD fused with its SPSA estimate, at inference memory (the MeZO update).

"Fine-Tuning Language Models with Just Forward Passes" (Malladi et al., 2023):

    c_k = [f(θ + ε z_k) − f(θ − ε z_k)] / (2ε),    θ ← θ(1 − η λ) − (η/K) Σ_k c_k z_k,

where each ``z_k`` is regenerated from its seed once more for the update, chunk by chunk, so no gradient (nor
any other parameter-sized buffer) is ever held. The last evaluation's shift is undone in the same pass as the
update, so a step with one direction regenerates ``z`` three times (shift, move to the other side, undo + update).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .._validate import check_nonneg, check_positive
from ..distributed import Comm
from .base import Closure
from .spsa import SPSA

__all__ = ["ZOSGD"]

_Optimizer = torch.optim.Optimizer


def _plain(method: Any) -> Any:
    """A ``torch.optim.Optimizer`` method without its ``torch._dynamo`` wrapper.

    torch wraps ``add_param_group``, ``state_dict``, ``load_state_dict`` and ``zero_grad`` so that dynamo skips
    them; the wrapper imports ``torch._dynamo`` on first use, ≈70 MiB of resident memory — more than the whole
    overhead of the fused zeroth-order step on a 34 M-parameter model. ZOSGD never runs under dynamo.
    """
    return getattr(method, "__wrapped__", method)


def _groups(model_or_params: Any) -> tuple[Any, list[dict[str, Any]] | None]:
    """``(params, groups)``: groups when ``model_or_params`` is torch's list of param-group dicts, else None.

    An iterator (e.g. ``model.parameters()``) is read once, here, and returned as a list.
    """
    if isinstance(model_or_params, (torch.nn.Module, torch.Tensor)):
        return model_or_params, None
    items = list(model_or_params)
    if not items or not isinstance(items[0], dict):
        return items, None
    groups = []
    for g in items:
        if not isinstance(g, dict) or "params" not in g:
            raise ValueError("model_or_params must hold tensors or parameter-group dicts with a 'params' key, "
                             f"got {g!r}")
        ps = g["params"]
        groups.append({**g, "params": [ps] if isinstance(ps, torch.Tensor) else list(ps)})
    return [p for g in groups for p in g["params"]], groups


class ZOSGD(SPSA, _Optimizer):
    """The fused zeroth-order mode: both the gradient source (SPSA's estimator) and the SGD update.

    How it plugs in. ZOSGD is a closure optimizer, like ``torch.optim.LBFGS``: ``loss = opt.step(closure)``
    evaluates ``2·n_directions`` losses under ``torch.no_grad`` and moves the parameters. It is also a
    :class:`~gradkit.sources.Source`, so it runs in a Pipeline as *both* stages::

        zo = gk.sources.ZOSGD(model, lr=1e-3, eps=1e-3, seed=0)
        pipe = gk.Pipeline(source=zo, optimizer=zo)

    There ``estimate(closure)`` applies the update and the Pipeline's following ``optimizer.step()`` (without
    closure) is a no-op; a bare ``step()`` that does not follow an ``estimate`` raises ``ValueError``. No
    ``.grad`` is written, so gradient transforms have nothing to act on: use :class:`~gradkit.sources.SPSA`
    (the general mode) with any optimizer when transforms are needed.

    Parameter groups work as in torch (``[{"params": decay, "weight_decay": 0.1}, {"params": no_decay,
    "weight_decay": 0.0}]``), each with its own ``lr`` and ``weight_decay``, and torch's LR schedulers act per
    group; groups cannot be added after construction (directions are seeded per parameter index).

    The closure must only compute the loss: one that runs ``backward()`` (e.g. Lightning's automatic
    optimization wraps the training step and the backward pass in the closure) raises ``RuntimeError`` with
    what to do instead, after the first evaluation, with parameters and ``.grad`` as they were. A non-finite
    loss raises :class:`~gradkit.NonFiniteError` before anything moves (``on_nonfinite="skip"``: nothing moves
    and the step is counted in ``nonfinite_skips``). Shifts are undone bit-exactly (see
    :mod:`gradkit.sources._perturb`); ``exact_restore=False`` drops that record, as MeZO does.

    Args:
        model_or_params: a module, tensors, or torch-style parameter groups (dicts with ``"params"``).
        lr: η, the learning rate (default 1e-3; per group).
        eps: ε, the perturbation size (default 1e-3).
        n_directions: K, directions averaged per step (default 1).
        weight_decay: λ, decoupled weight decay ``θ ← θ(1 − ηλ)`` (default 0; per group).
        seed: seed of the directions (default 0).
        distribution: ``"gaussian"`` (default) or ``"rademacher"`` z.
        exact_restore: bit-exact restoration after each evaluation (default True).
        comm: ``"auto"`` (default), None or a :class:`gradkit.distributed.Comm`.
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"``.
    """

    paper = "Fine-Tuning Language Models with Just Forward Passes"

    def __init__(self, model_or_params: torch.nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 lr: float = 1e-3, eps: float = 1e-3, n_directions: int = 1, *, weight_decay: float = 0.0,
                 seed: int = 0, distribution: str = "gaussian", exact_restore: bool = True,
                 comm: Comm | str | None = "auto", on_nonfinite: str = "raise"):
        model_or_params, groups = _groups(model_or_params)
        check_positive("lr", lr)
        check_nonneg("weight_decay", weight_decay)
        self._frozen_groups = False
        SPSA.__init__(self, model_or_params, eps, n_directions, seed=seed, distribution=distribution,
                      exact_restore=exact_restore, comm=comm, on_nonfinite=on_nonfinite)
        _Optimizer.__init__(self, groups if groups is not None else self.params,
                            {"lr": lr, "weight_decay": weight_decay})
        self._frozen_groups = True
        self._estimated = False

    def write(self, losses: torch.Tensor) -> None:
        """``θ ← θ(1 − ηλ) − η·ĝ`` per group, straight into the parameters (undoing the last shift in passing)."""
        ks, w = self.weights(losses)
        hyper = {id(p): (float(g["lr"]), float(g["weight_decay"])) for g in self.param_groups for p in g["params"]}
        scale = [-hyper[id(p)][0] if id(p) in hyper else None for p in self.params]
        decay = [hyper[id(p)][0] * hyper[id(p)][1] if id(p) in hyper else 0.0 for p in self.params]
        self.perturbation.apply(self.step_count, ks, w, scale, decay)
        self.step_count += 1

    def estimate(self, closure: Closure) -> torch.Tensor:
        loss = super().estimate(closure)
        self._estimated = True
        return loss

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor | None:  # type: ignore[override]
        if closure is not None:
            return self.estimate(closure)
        if not self._estimated:
            raise ValueError("ZOSGD.step needs a closure (it evaluates the loss itself), unless it follows "
                             "ZOSGD.estimate(closure) in a Pipeline")
        self._estimated = False
        return None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._frozen_groups:
            raise ValueError("ZOSGD cannot take new parameter groups after construction (its directions are "
                             "seeded per parameter index)")
        check_positive("lr", param_group.get("lr", self.defaults["lr"]))
        check_nonneg("weight_decay", param_group.get("weight_decay", self.defaults["weight_decay"]))
        _plain(_Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _plain(_Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        sd = _plain(_Optimizer.state_dict)(self)
        sd["zo"] = SPSA.state_dict(self)
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        state = dict(state)
        zo = state.pop("zo")
        _plain(_Optimizer.load_state_dict)(self, state)
        SPSA.load_state_dict(self, zo)
        self._estimated = False

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer keeps only defaults/state/param_groups, which would leave a copy unable to step.
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        _Optimizer.__setstate__(self, state)
