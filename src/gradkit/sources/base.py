"""The Source protocol: how a gradient is obtained."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from .._kernels import all_finite
from .._stateful import Stage
from .._validate import NONFINITE_SINGLE, check_nonfinite
from ..errors import NonFiniteError

__all__ = ["Closure", "Source", "check_loss", "trainable_params"]

Closure = Callable[[], torch.Tensor]


def trainable_params(model_or_params: torch.nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters a source estimates: those with ``requires_grad``, de-duplicated, in order.

    Args:
        model_or_params: a module, one tensor, or an iterable of tensors.
    """
    if isinstance(model_or_params, torch.nn.Module):
        params = list(model_or_params.parameters())
    elif isinstance(model_or_params, torch.Tensor):
        params = [model_or_params]
    else:
        params = list(model_or_params)
    seen: set[int] = set()
    out = []
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"model_or_params must hold tensors, got {type(p).__name__}")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def check_loss(loss: Any, *, needs_grad: bool = False, where: str = "closure", finite: bool = True) -> torch.Tensor:
    """Validate what a closure returned: a real scalar tensor, with a graph when one is needed, and finite.

    Args:
        loss: what the closure returned.
        needs_grad: the loss must carry a graph (backprop will differentiate it). Default False.
        where: how the message names the closure. Default ``"closure"``.
        finite: test finiteness (``NonFiniteError``); False when the caller applies its own ``on_nonfinite``
            policy. Default True.
    """
    if not isinstance(loss, torch.Tensor):
        raise ValueError(f"the {where} must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"the {where} must return a scalar tensor, got shape {tuple(loss.shape)}")
    if not loss.is_floating_point():
        raise ValueError(f"the {where} must return a real floating-point loss, got dtype {loss.dtype}")
    if needs_grad and not loss.requires_grad:
        raise ValueError(
            f"the {where}'s loss does not require grad: it was computed without the trainable parameters "
            "(or under torch.no_grad), so backprop cannot differentiate it"
        )
    if finite and not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteError(f"the {where} returned a non-finite loss ({loss.item()}); nothing was updated")
    return loss.reshape(())


def _plain(x: Any) -> bool:
    """True for nested dicts/lists/tuples of immutable Python scalars (safe to keep without copying)."""
    if isinstance(x, dict):
        return all(_plain(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_plain(v) for v in x)
    return x is None or isinstance(x, (bool, int, float, str, bytes))


class Source(Stage):
    """How a gradient is obtained. ``estimate(closure)`` returns the loss and overwrites ``.grad``.

    ``closure`` is a zero-argument callable returning a scalar loss tensor; it must not call ``backward``.
    Sources with randomness take ``seed=`` and are reproducible; ``state_dict()`` captures whatever a
    resumed run needs to continue identically.

    Args:
        model_or_params: a module (its parameters with ``requires_grad``) or an iterable of tensors.
        on_nonfinite: what a NaN/Inf loss or gradient does (README, "Non-finite values"): ``"raise"`` (default,
            :class:`~gradkit.NonFiniteError`; ``.grad`` and the source's state as before the call), ``"skip"``
            (no gradient is written: every parameter's ``.grad`` is set to ``None`` so a following optimizer step
            moves nothing, the source's state is as before, ``nonfinite_skips`` counts it and the returned loss
            is NaN), or ``"ignore"`` (no check, no cost; the values are written as they are).

    Class attributes:
        runs_backward: ``estimate`` runs an autograd backward pass (so gradient hooks fire, e.g. GradES's).
        nonfinite_policies: the ``on_nonfinite`` values this source can honour.
        self_guarded: ``estimate`` runs under :meth:`_guarded` (applies ``on_nonfinite`` and rolls back on any
            error itself), so a Pipeline need not snapshot it as well.
    """

    paper: ClassVar[str] = ""
    runs_backward: ClassVar[bool] = False
    self_guarded: ClassVar[bool] = False
    nonfinite_policies: ClassVar[tuple[str, ...]] = NONFINITE_SINGLE

    def __init__(self, model_or_params: torch.nn.Module | Iterable[torch.Tensor], *, on_nonfinite: str = "raise"):
        self.params = trainable_params(model_or_params)
        if not self.params:
            raise ValueError("model_or_params has no parameter with requires_grad=True")
        self.on_nonfinite = check_nonfinite(on_nonfinite, self.nonfinite_policies, where=type(self).__name__)
        self.nonfinite_skips = 0
        #: True when the last ``estimate`` verified that its loss and gradients are finite.
        self.checked_finite = False

    def estimate(self, closure: Closure) -> torch.Tensor:
        raise NotImplementedError

    def active_params(self) -> list[torch.Tensor]:
        """Parameters still trainable now (a controller may have frozen some since construction)."""
        return [p for p in self.params if p.requires_grad]

    # -- rollback ----------------------------------------------------------------------------------------
    def snapshot(self) -> Any:
        """What :meth:`restore` needs to undo one ``estimate`` (called before every Pipeline step, so: cheap).

        The default keeps ``state_dict()`` as it is when it holds only Python scalars (a step counter, a seed:
        the usual case, no copy) and a deep copy otherwise. A source with large state that one ``estimate`` only
        partly changes overrides both methods.
        """
        state = self.state_dict()
        return state if _plain(state) else copy.deepcopy(state)

    def restore(self, snapshot: Any) -> None:
        """Undo everything since :meth:`snapshot` (e.g. put the random stream back after a skipped step)."""
        self.load_state_dict(snapshot)

    # -- the non-finite policy -----------------------------------------------------------------------------
    def _guarded(self, params: list[torch.Tensor], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``compute`` (which writes ``.grad`` of ``params`` and returns the loss) under ``on_nonfinite``.

        Before ``compute`` every ``.grad`` is set to ``None`` (a source overwrites it anyway), so ``compute`` can
        tell whether the closure ran a backward pass of its own. On any exception the gradients and the source's
        state are put back as they were; a non-finite loss or gradient is then raised or skipped per the policy.
        The loss and every gradient are checked with one host synchronisation.
        """
        saved = [p.grad for p in params]
        snap = self.snapshot()
        self.checked_finite = False
        for p in params:
            p.grad = None
        try:
            loss = compute()
            if self.on_nonfinite != "ignore":
                grads = [p.grad for p in params if p.grad is not None]
                if not all_finite([loss.detach(), *grads]):
                    what = "loss" if not bool(torch.isfinite(loss.detach())) else "gradient"
                    raise NonFiniteError(f"{type(self).__name__}: a non-finite {what} (NaN/Inf); nothing was updated")
                self.checked_finite = True
            return loss
        except NonFiniteError:
            self.restore(snap)
            if self.on_nonfinite != "skip":
                for p, g in zip(params, saved):
                    p.grad = g
                raise
            for p in params:
                p.grad = None
            self.nonfinite_skips += 1
            return torch.tensor(float("nan"))
        except BaseException:
            self.restore(snap)
            for p, g in zip(params, saved):
                p.grad = g
            raise
