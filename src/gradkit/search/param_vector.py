"""A model's parameters as one flat vector, for searching weights with an ask/tell searcher."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["ParamVector"]


class Settable:
    """A search space read with ``get()`` and written with ``set(x)``; ``at(x)`` sets it for a ``with`` block.

    A base class with no arguments: subclasses define ``get`` and ``set``.
    """

    def get(self) -> torch.Tensor:
        raise NotImplementedError

    def set(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def at(self, x: torch.Tensor) -> Iterator[None]:
        """Temporarily set the space to ``x``; the previous values are restored on exit (also on error)."""
        saved = self.get()
        self.set(x)
        try:
            yield
        finally:
            self.set(saved)


class ParamVector(Settable):
    """Flat view of a model's parameters: ``get()`` reads them as one ``[d]`` tensor, ``set(x)`` writes them back.

    With ``share=True`` (default, possible when all parameters have one dtype and device) the parameters are
    re-pointed into one contiguous buffer, so ``vector`` *is* the model's weights: ``set(x)`` is a single
    ``copy_`` and nothing is gathered or scattered. The ``nn.Parameter`` objects stay the same (optimizers
    and hooks keep working); only their storage moves. Otherwise ``set`` copies slice by slice.

    Args:
        model: an ``nn.Module`` or an iterable of parameters (or ``(name, parameter)`` pairs).
        trainable_only: skip parameters with ``requires_grad=False``.
        share: re-point the parameters into one flat buffer when possible.
    """

    def __init__(self, model: nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *,
                 trainable_only: bool = True, share: bool = True):
        if isinstance(model, nn.Module):
            named = list(model.named_parameters())
        else:
            items = list(model)
            named = [it if isinstance(it, tuple) else (str(i), it) for i, it in enumerate(items)]
        named = [(n, p) for n, p in named if p.requires_grad or not trainable_only]
        if not named:
            raise ValueError("model has no parameters to search (trainable_only=True skips frozen ones)")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = sum(self.numels)
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        self.shared = bool(share) and len(dtypes) == 1 and len(devices) == 1
        self.dtype = self.params[0].dtype if len(dtypes) == 1 else torch.float32
        self.device = self.params[0].device
        self._flat: torch.Tensor | None = None
        if self.shared:
            with torch.no_grad():
                flat = torch.cat([p.detach().reshape(-1) for p in self.params])
                offset = 0
                for p, n in zip(self.params, self.numels):
                    p.data = flat[offset:offset + n].view_as(p)
                    offset += n
            self._flat = flat

    def __len__(self) -> int:
        return self.dim

    @property
    def vector(self) -> torch.Tensor:
        """The live flat buffer when shared (writing to it changes the model), else a fresh concatenation."""
        if self._flat is not None:
            return self._flat
        return self.get()

    def get(self) -> torch.Tensor:
        """A copy of the current parameters as one ``[d]`` tensor."""
        if self._flat is not None:
            return self._flat.clone()
        return torch.cat([p.detach().reshape(-1).to(self.dtype) for p in self.params])

    @torch.no_grad()
    def set(self, x: torch.Tensor) -> None:
        """Write ``x`` (``[d]``, any float dtype) into the parameters."""
        x = torch.as_tensor(x)
        if x.shape != (self.dim,):
            raise ValueError(f"x must have shape [{self.dim}], got {tuple(x.shape)}")
        if self._flat is not None:
            self._flat.copy_(x)
            return
        offset = 0
        for p, n in zip(self.params, self.numels):
            p.copy_(x[offset:offset + n].view(p.shape))
            offset += n

    @torch.no_grad()
    def evaluate(self, fn: Callable[[], Any], candidates: torch.Tensor) -> torch.Tensor:
        """``[pop]`` values of ``fn()`` with the parameters set to each row of ``candidates``; restores after."""
        if candidates.dim() != 2 or candidates.shape[1] != self.dim:
            raise ValueError(f"candidates must have shape [pop, {self.dim}], got {tuple(candidates.shape)}")
        saved = self.get()
        try:
            out = []
            for row in candidates:
                self.set(row)
                out.append(torch.as_tensor(fn()).detach().reshape(()).to(torch.float64))
            return torch.stack(out)
        finally:
            self.set(saved)

    def unflatten(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: view}`` of ``x`` shaped like the parameters (leading batch dims kept), e.g. for
        ``torch.func.functional_call`` under ``torch.vmap`` to evaluate a whole population at once."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must end in dimension {self.dim}, got {tuple(x.shape)}")
        batch = x.shape[:-1]
        out, offset = {}, 0
        for name, shape, n in zip(self.names, self.shapes, self.numels):
            out[name] = x[..., offset:offset + n].reshape(*batch, *shape)
            offset += n
        return out
