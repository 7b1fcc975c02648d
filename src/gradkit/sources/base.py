"""The Source protocol: how a gradient is obtained."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from .._stateful import Stateful
from ..errors import NonFiniteError

__all__ = ["Closure", "Source", "check_loss", "trainable_params"]

Closure = Callable[[], torch.Tensor]


def trainable_params(model_or_params: torch.nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters a source estimates: those with ``requires_grad``, de-duplicated, in order."""
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


def check_loss(loss: Any, *, needs_grad: bool = False, where: str = "closure") -> torch.Tensor:
    """Validate what a closure returned: a real scalar tensor, finite, with a graph when one is needed."""
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
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteError(f"the {where} returned a non-finite loss ({loss.item()}); nothing was updated")
    return loss.reshape(())


class Source(Stateful):
    """How a gradient is obtained. ``estimate(closure)`` returns the loss and overwrites ``.grad``.

    ``closure`` is a zero-argument callable returning a scalar loss tensor; it must not call ``backward``.
    Sources with randomness take ``seed=`` and are reproducible; ``state_dict()`` captures whatever a
    resumed run needs to continue identically.
    """

    paper: ClassVar[str] = ""

    def __init__(self, model_or_params: torch.nn.Module | Iterable[torch.Tensor]):
        self.params = trainable_params(model_or_params)
        if not self.params:
            raise ValueError("model_or_params has no parameter with requires_grad=True")

    def estimate(self, closure: Closure) -> torch.Tensor:
        raise NotImplementedError


    def active_params(self) -> list[torch.Tensor]:
        """Parameters still trainable now (a controller may have frozen some since construction)."""
        return [p for p in self.params if p.requires_grad]
