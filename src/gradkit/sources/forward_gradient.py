"""ForwardGradient: an unbiased gradient from forward-mode directional derivatives, no backward pass.

"Gradients without Backpropagation" (Baydin et al., 2022): ``g = (∇f·v) v`` with ``v ~ N(0, I)``, the
directional derivative ``∇f·v`` computed by forward-mode AD in the same pass as ``f``; ``E[g] = ∇f``.
With ``K`` directions the estimates are averaged. "Can Forward Gradient Match Backpropagation?" (Fournier
et al., 2023) replaces the random ``v`` by an informed *guess* ``u`` (e.g. a local-loss gradient) and uses
the projection ``g = (∇f·u) u / ‖u‖²``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from .._validate import check_int
from ..errors import NonFiniteError
from ._perturb import Perturbation, _GradWatch, check_losses, grad_enabled_error
from .base import Closure, Source

__all__ = ["ForwardGradient"]

Guess = Callable[[], Sequence[torch.Tensor]]


class ForwardGradient(Source):
    """Forward-gradient source: ``n_directions`` forward-mode passes, each giving ``(∇f·v) v``.

    The user's zero-argument closure is unchanged: while it runs, every trainable parameter of ``model``
    is swapped for a dual tensor (primal = the parameter, tangent = the direction) and swapped back
    afterwards, even if the closure raises. The closure runs under ``torch.no_grad``: no graph is built,
    and activation memory is that of inference plus the tangents.

    ``guess``: optional zero-argument callable returning one direction per trainable parameter (in
    ``model.parameters()`` order, frozen ones omitted), called once per direction; the estimate is then the
    projection of the gradient onto the guess, ``(∇f·u) u / ‖u‖²`` — not unbiased for ``∇f`` but of much
    lower variance when ``u`` correlates with it. Without a guess, ``v ~ N(0, I)`` is regenerated from
    ``(seed, step, direction, parameter)``, and the estimate is unbiased.

    Per-sample closures: when the module has one trainable parameter ``x`` of shape ``[B, ...]`` and the closure
    returns ``B`` losses, row ``b`` gets ``(∂ℓ_b·v[b]) v[b]`` (with a guess, ``u[b]`` and ``‖u[b]‖²``), which
    involves only ``ℓ_b`` and row ``b`` as long as ``ℓ_b`` depends on row ``b`` alone; ``estimate`` returns
    the ``B`` losses.

    Requires an ``nn.Module`` (its parameters are what gets swapped). Parameters that the loss does not
    depend on get a zero gradient estimate (their tangent contributes nothing).

    Args:
        model: the module whose trainable parameters get the estimate.
        n_directions: K, forward-mode passes averaged per estimate (default 1).
        seed: seed of the directions v (default 0).
        guess: optional callable returning guessed directions u (default None: random v ~ N(0, I)).
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"`` (see :class:`~gradkit.sources.Source`).
    """

    paper = "Gradients without Backpropagation"

    self_guarded = True

    def __init__(self, model: torch.nn.Module, n_directions: int = 1, *, seed: int = 0,
                 guess: Guess | None = None, on_nonfinite: str = "raise"):
        if not isinstance(model, torch.nn.Module):
            raise ValueError("model must be a torch.nn.Module: ForwardGradient swaps its parameters for dual "
                             f"tensors while the closure runs, got {type(model).__name__}")
        super().__init__(model, on_nonfinite=on_nonfinite)
        if guess is not None and not callable(guess):
            raise ValueError(f"guess must be a zero-argument callable returning directions, got {guess!r}")
        self.model = model
        self.n_directions = check_int("n_directions", n_directions, 1)
        self.seed = check_int("seed", seed, 0)
        self.guess = guess
        self._directions = Perturbation(self.params, self.seed, "gaussian")
        self.step_count = 0

    def _slots(self, active: list[torch.Tensor]) -> list[tuple[torch.nn.Module, str, int]]:
        """(module, name, index into ``active``) for every registration of an active parameter (tied ones too)."""
        where = {id(p): j for j, p in enumerate(active)}
        slots = []
        for mod in self.model.modules():
            for name, p in mod._parameters.items():
                if p is not None and id(p) in where:
                    slots.append((mod, name, where[id(p)]))
        return slots

    def _batch(self, active: list[torch.Tensor]) -> int | None:
        return active[0].shape[0] if len(self.params) == 1 and len(active) == 1 and active[0].dim() >= 1 else None

    def _directions_for(self, k: int, active_idx: list[int], active: list[torch.Tensor]
                        ) -> tuple[list[torch.Tensor], float | torch.Tensor]:
        if self.guess is None:
            return [self._directions.direction(i, self.step_count, k) for i in active_idx], 1.0
        u = list(self.guess())
        if len(u) != len(active) or any(not isinstance(t, torch.Tensor) or t.shape != p.shape
                                        for t, p in zip(u, active)):
            raise ValueError("guess() must return one tensor per trainable parameter, shaped like it "
                             f"({len(active)} expected, got {len(u)})")
        u = [t.detach().to(p.dtype) for t, p in zip(u, active)]
        batch = self._batch(active)
        if batch is not None:  # one squared norm per row: rows are separate problems
            sq_rows = u[0].double().reshape(batch, -1).square().sum(1)
            if not bool(torch.isfinite(sq_rows).all()) or bool((sq_rows == 0).any()):
                raise ValueError("guess() returned a zero or non-finite direction for some row")
            return u, 1.0 / sq_rows
        sq = sum(float(t.double().square().sum()) for t in u)
        if not math.isfinite(sq) or sq == 0.0:
            raise ValueError(f"guess() returned a zero or non-finite direction (squared norm {sq})")
        return u, 1.0 / sq

    def jvp(self, closure: Closure, tangents: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, ∇f·v)`` at the current parameters for tangents ``v`` (one per active parameter), float64.

        Both are scalars, or ``[B]`` for a closure returning one loss per row of the single parameter.
        """
        active = self.active_params()
        slots = self._slots(active)
        watch = _GradWatch(active)
        with torch.no_grad(), fwAD.dual_level():
            duals = [fwAD.make_dual(p.detach(), v) for p, v in zip(active, tangents)]
            for mod, name, j in slots:
                mod._parameters[name] = duals[j]
            try:
                out = closure()
            except RuntimeError as exc:
                if "does not require grad" in str(exc):  # the closure tried to back-propagate through the duals
                    watch.restore()
                    raise grad_enabled_error("closure") from exc
                raise
            finally:
                for mod, name, j in slots:
                    mod._parameters[name] = active[j]
            if watch.changed():
                watch.restore()
                raise grad_enabled_error("closure")
            if not isinstance(out, torch.Tensor):
                check_losses(out, None)
            primal, tangent = fwAD.unpack_dual(out)
            loss = check_losses(primal, self._batch(active))
            if tangent is None:
                raise ValueError("the closure's loss does not depend on the model's trainable parameters "
                                 "(no forward-mode tangent reached it), so there is no gradient to estimate")
            dd = tangent.detach().reshape(loss.shape).to(torch.float64)
        if self.on_nonfinite != "ignore":
            if not bool(torch.isfinite(loss).all()):
                raise NonFiniteError(f"the closure returned a non-finite loss ({loss.tolist()}); nothing was updated")
            if not bool(torch.isfinite(dd).all()):
                raise NonFiniteError(f"the directional derivative is non-finite ({dd.tolist()}); nothing was updated")
        return loss, dd

    def estimate(self, closure: Closure) -> torch.Tensor:
        return self._guarded(self.active_params(), lambda: self._estimate(closure))

    def _estimate(self, closure: Closure) -> torch.Tensor:
        active = self.active_params()
        active_idx = [i for i, p in enumerate(self.params) if p.requires_grad]
        acc: list[torch.Tensor] | None = None
        total: torch.Tensor | float = 0.0
        for k in range(self.n_directions):
            v, scale = self._directions_for(k, active_idx, active)
            loss, dd = self.jvp(closure, v)
            total = total + loss
            c = dd * scale / self.n_directions
            if c.dim() == 0:
                cf = float(c)
                if acc is None:
                    acc = [t.mul_(cf) if self.guess is None else t * cf for t in v]
                else:
                    torch._foreach_add_(acc, v, alpha=cf)
            else:  # per-row coefficients
                t = v[0]
                cr = c.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))
                acc = [t * cr] if acc is None else [acc[0].add_(t * cr)]
        for p, g in zip(active, acc):
            p.grad = g
        self.step_count += 1
        mean = total / self.n_directions
        return mean.to(torch.float32) if mean.dim() == 0 else mean.to(active[0].dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.seed = self._directions.seed = int(state["seed"])
