"""ZOSGD: zeroth-order SGD fused with its SPSA estimate, at inference memory (the MeZO update).

"Fine-Tuning Language Models with Just Forward Passes" (Malladi et al., 2023):

    c_k = [f(θ + ε z_k) − f(θ − ε z_k)] / (2ε),    θ ← θ(1 − η λ) − (η/K) Σ_k c_k z_k,

where each ``z_k`` is regenerated from its seed once more for the update, one parameter at a time, so no
gradient (nor any other parameter-sized buffer) is ever held: peak memory is that of inference plus one
parameter tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .._validate import check_int, check_nonneg, check_positive
from ..distributed import Comm, resolve_comm
from ._perturb import Perturbation
from .base import Closure, Source

__all__ = ["ZOSGD"]


class ZOSGD(Source, torch.optim.Optimizer):
    """The fused zeroth-order mode: both the gradient source and the (plain SGD) update.

    How it plugs in. ZOSGD is a closure optimizer, like ``torch.optim.LBFGS``: ``loss = opt.step(closure)``
    evaluates ``2·n_directions`` losses under ``torch.no_grad`` and moves the parameters. It is also a
    :class:`~gradkit.sources.Source`, so it runs in a Pipeline as *both* stages::

        zo = gk.sources.ZOSGD(model, lr=1e-3, eps=1e-3, seed=0)
        pipe = gk.Pipeline(source=zo, optimizer=zo)

    There ``estimate(closure)`` applies the update and the Pipeline's following ``optimizer.step()`` (without
    closure) is a no-op; a bare ``step()`` that does not follow an ``estimate`` raises ``ValueError``. No
    ``.grad`` is written, so gradient transforms have nothing to act on: use :class:`~gradkit.sources.SPSA`
    (the general mode) with any optimizer when transforms are needed. Learning-rate schedulers work as
    for any torch optimizer. A non-finite loss raises
    :class:`~gradkit.NonFiniteError` before anything moves. Shifts are undone bit-exactly (a sparse record
    of the elements whose round trip ``p + d − d`` is inexact, see :mod:`gradkit.sources._perturb`);
    ``exact_restore=False`` drops that record, as MeZO does, for the smallest memory.
    """

    paper = "Fine-Tuning Language Models with Just Forward Passes"

    def __init__(self, model_or_params: torch.nn.Module | Iterable[torch.Tensor], lr: float = 1e-3,
                 eps: float = 1e-3, n_directions: int = 1, *, weight_decay: float = 0.0, seed: int = 0,
                 distribution: str = "gaussian", exact_restore: bool = True, comm: Comm | str | None = "auto"):
        Source.__init__(self, model_or_params)
        check_positive("lr", lr)
        check_nonneg("weight_decay", weight_decay)
        torch.optim.Optimizer.__init__(self, self.params, {"lr": lr, "weight_decay": weight_decay})
        self.eps = check_positive("eps", eps)
        self.n_directions = check_int("n_directions", n_directions, 1)
        self.seed = check_int("seed", seed, 0)
        self.perturbation = Perturbation(self.params, self.seed, distribution, exact=exact_restore)
        self.distribution = distribution
        self.step_count = 0
        self._estimated = False
        self.comm = resolve_comm(comm, self.seed)

    def estimate(self, closure: Closure) -> torch.Tensor:
        t, pert = self.step_count, self.perturbation
        ks = range(self.n_directions)
        def evaluate(mine) -> torch.Tensor:
            return pert.evaluate(closure, t, [(k, s * self.eps) for k in mine for s in (1.0, -1.0)])

        if self.comm is None:
            scalars = evaluate(ks).reshape(self.n_directions, 2)
        else:  # each rank evaluates its share of the directions; all apply every direction from the seeds
            scalars = self.comm.gather_scalars(lambda: evaluate(self.comm.split(self.n_directions)),
                                               self.n_directions, per_item=2)
        coef = ((scalars[:, 0] - scalars[:, 1]) / (2.0 * self.eps * self.n_directions)).tolist()
        with torch.no_grad():
            for group in self.param_groups:
                lr, wd = float(group["lr"]), float(group["weight_decay"])
                if wd:
                    for p in group["params"]:
                        if p.requires_grad:
                            p.mul_(1.0 - lr * wd)
                ids = {id(p) for p in group["params"]}
                idx = [i for i, p in enumerate(self.params) if id(p) in ids]
                pert.apply(t, ks, coef, -lr, only=idx)
        self.step_count += 1
        self._estimated = True
        return scalars.mean().to(torch.float32)

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
        if hasattr(self, "perturbation"):
            raise ValueError("ZOSGD cannot take new parameter groups after construction (its directions are "
                             "seeded per parameter index)")
        check_positive("lr", param_group.get("lr", self.defaults["lr"]))
        check_nonneg("weight_decay", param_group.get("weight_decay", self.defaults["weight_decay"]))
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        sd = torch.optim.Optimizer.state_dict(self)
        sd["zo"] = {"step": self.step_count, "seed": self.seed}
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        state = dict(state)
        zo = state.pop("zo")
        torch.optim.Optimizer.load_state_dict(self, state)
        self.step_count = int(zo["step"])
        self.seed = self.perturbation.seed = int(zo["seed"])
        self._estimated = False
