"""Search spaces over a model: low-rank adapters whose singular values are the searched vector (ESSA).

Paper: "ESSA: Evolutionary Strategies for Scalable Alignment": adapters ΔW = B·A on chosen linear layers are
SVD-factored, ΔW = U·diag(s)·Vᵀ, U and V are frozen and only the singular values s are searched, which
shrinks the search from millions of weights to (rank × layers) numbers.

Each adapted ``nn.Linear`` computes ``y = W x + b + U diag(s) Vᵀ x`` through a forward hook; the weights W are
never copied or modified.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .._validate import check_choice, check_int

__all__ = ["LoRASingularValues"]


def _orthonormal(rows: int, cols: int, gen: torch.Generator, dtype: torch.dtype, device) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(device))
    # Sign fix makes the basis a deterministic function of the draw (QR is unique up to column signs).
    return (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q)).to(dtype)


class LoRASingularValues:
    """ESSA's search space: ``rank`` singular values per adapted linear layer, as one flat vector.

    Args:
        model: the network; its weights stay untouched.
        rank: r, the adapter rank per layer (at most ``min(in, out)``).
        layers: names of the ``nn.Linear`` modules to adapt (default: every ``nn.Linear``).
        basis: where U, V come from when ``adapters`` is not given: ``"weight"`` — the top-r singular vectors of
            each layer's own W (s then moves W's principal directions); ``"random"`` — random orthonormal
            columns (seeded by ``seed``).
        adapters: ``{layer name: (A [r, in], B [out, r])}`` trained LoRA factors (ESSA: after a short
            supervised fine-tune); each ``B·A`` is SVD-factored, U/V frozen, and ``x0`` holds its singular
            values, so searching starts exactly at the fine-tuned adapters.

    ``dim``: length of the searched vector; ``x0``: its starting value; ``set(s)`` / ``get()``; ``vector``
    is the live tensor the hooks read (``requires_grad_()`` it to fine-tune the same space by backprop);
    ``factors()``: the U and V tensors; ``remove()`` detaches the hooks.
    """

    paper = "ESSA: Evolutionary Strategies for Scalable Alignment"

    def __init__(self, model: nn.Module, rank: int, *, layers: Sequence[str] | None = None,
                 basis: str = "weight", adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 seed: int = 0):
        self.rank = check_int("rank", rank, 1)
        self.basis = check_choice("basis", basis, ("weight", "random"))
        modules = dict(model.named_modules())
        if layers is None:
            layers = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        layers = list(layers)
        if not layers:
            raise ValueError("layers must name at least one nn.Linear (the model has none)")
        for name in layers:
            if not isinstance(modules.get(name), nn.Linear):
                raise ValueError(f"layers: {name!r} is not an nn.Linear of the model")
            lin = modules[name]
            if self.rank > min(lin.in_features, lin.out_features):
                raise ValueError(f"rank must be <= min(in, out) = {min(lin.in_features, lin.out_features)} "
                                 f"for layer {name!r}, got {rank}")
        if adapters is not None:
            unknown = set(adapters) - set(layers)
            if unknown:
                raise ValueError(f"adapters name layers that are not adapted: {sorted(unknown)}")
        self.layers = layers
        first = modules[layers[0]].weight
        self.dtype, self.device = first.dtype, first.device
        gen = torch.Generator().manual_seed(seed)
        self.U: list[torch.Tensor] = []
        self.V: list[torch.Tensor] = []
        x0 = []
        for name in layers:
            lin = modules[name]
            w = lin.weight.detach().to(torch.float64)
            if adapters is not None and name in adapters:
                a, b = adapters[name]
                if a.shape != (self.rank, lin.in_features) or b.shape != (lin.out_features, self.rank):
                    raise ValueError(f"adapters[{name!r}] must be (A [{self.rank}, {lin.in_features}], "
                                     f"B [{lin.out_features}, {self.rank}]), got {tuple(a.shape)}, {tuple(b.shape)}")
                u, s, vh = torch.linalg.svd(b.detach().to(torch.float64) @ a.detach().to(torch.float64),
                                            full_matrices=False)
                u, s, v = u[:, :self.rank], s[:self.rank], vh[:self.rank].T
            elif self.basis == "weight":
                u, _, vh = torch.linalg.svd(w, full_matrices=False)
                u, v, s = u[:, :self.rank], vh[:self.rank].T, torch.zeros(self.rank, dtype=torch.float64)
            else:
                u = _orthonormal(lin.out_features, self.rank, gen, torch.float64, "cpu")
                v = _orthonormal(lin.in_features, self.rank, gen, torch.float64, "cpu")
                s = torch.zeros(self.rank, dtype=torch.float64)
            self.U.append(u.to(self.dtype).to(self.device).contiguous())
            self.V.append(v.to(self.dtype).to(self.device).contiguous())
            x0.append(s)
        self.x0 = torch.cat(x0)
        self.dim = self.x0.numel()
        self.vector = self.x0.to(dtype=self.dtype, device=self.device).clone()
        self._handles = [modules[name].register_forward_hook(self._hook(i)) for i, name in enumerate(layers)]

    def _hook(self, i: int):
        r = self.rank

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            h = inputs[0] @ self.V[i]
            s = self.vector[..., i * r:(i + 1) * r]
            if s.dim() == 2:  # population mode: s [pop, r] against activations [pop, ..., r]
                s = s.view(s.shape[0], *([1] * (h.dim() - 2)), r)
            return output + (h * s) @ self.U[i].T

        return hook

    def __len__(self) -> int:
        return self.dim

    def get(self) -> torch.Tensor:
        return self.vector.detach().clone()

    @torch.no_grad()
    def set(self, s: torch.Tensor) -> None:
        """Write the singular values (``[dim]``, any float dtype) read by the adapted layers."""
        s = torch.as_tensor(s)
        if s.shape != (self.dim,):
            raise ValueError(f"s must have shape [{self.dim}], got {tuple(s.shape)}")
        self.vector.copy_(s)

    @contextlib.contextmanager
    def at(self, s: torch.Tensor) -> Iterator[None]:
        saved = self.get()
        self.set(s)
        try:
            yield
        finally:
            self.set(saved)

    @contextlib.contextmanager
    def population(self, candidates: torch.Tensor) -> Iterator[None]:
        """Evaluate a whole population in one forward pass: inside, feed inputs with a leading population
        dimension (``x.expand(pop, *x.shape)`` costs no copy) and candidate k's adapters act on slice k."""
        c = torch.as_tensor(candidates)
        if c.dim() != 2 or c.shape[1] != self.dim:
            raise ValueError(f"candidates must have shape [pop, {self.dim}], got {tuple(c.shape)}")
        saved = self.vector
        self.vector = c.to(dtype=self.dtype, device=self.device)
        try:
            yield
        finally:
            self.vector = saved

    def factors(self) -> list[torch.Tensor]:
        """U and V of every adapted layer (``requires_grad_()`` them to fine-tune whole adapters by backprop)."""
        return [*self.U, *self.V]

    def delta_weight(self, i: int) -> torch.Tensor:
        """ΔW = U diag(s) Vᵀ of the i-th adapted layer."""
        r = self.rank
        return (self.U[i] * self.vector[i * r:(i + 1) * r]) @ self.V[i].T

    def remove(self) -> None:
        """Detach the hooks: the model computes with its own weights again."""
        for h in self._handles:
            h.remove()
        self._handles = []
