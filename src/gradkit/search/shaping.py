"""Fitness shaping and the evolution-strategies gradient: one implementation for the searchers and the ES source.

A shaping maps the fitness values of a population (minimisation: lower is better) to the values an update
weighs the samples by, *loss-like*: a worse sample gets a larger value, so ``Σ_j F_j ε_j`` points uphill and
a method descends along its negative. Shapings act along dim 0 (the population) and keep any trailing
dimensions (e.g. one column per sample of a batched closure), so the same object serves
:class:`gradkit.search.OpenAIES`, :class:`gradkit.search.PGPE`, :class:`gradkit.search.SNES` and
:class:`gradkit.sources.ES`.

Non-finite fitness (NaN/±Inf): rank-based shapings rank it behind every finite value (the "worst" policy);
:class:`Raw` passes it through (a caller with ``on_nonfinite="worst"`` gives those samples weight 0).

The ES gradient (Salimans et al., 2017, "Evolution Strategies as a Scalable Alternative to Reinforcement
Learning"): with samples ``θ + σ ε_j``, ``ĝ = 1/(nσ) Σ_j F_j ε_j`` — :func:`es_weights` returns the coefficients
``F_j / (nσ)`` of the ``ε_j``; a searcher multiplies them with its explicit ``ε`` rows, the ES source with
directions regenerated from seeds.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["CentredRanks", "FitnessShaping", "NESUtilities", "Raw", "centred_ranks", "es_weights",
           "nes_utilities", "resolve_shaping"]


def _ranks(f: torch.Tensor) -> torch.Tensor:
    """0-based ranks along dim 0 (smallest first; ties by position; non-finite values last)."""
    out_dtype = f.dtype if f.is_floating_point() else torch.float64
    key = torch.where(torch.isnan(f), torch.full_like(f, math.inf), f) if f.is_floating_point() else f
    n = f.shape[0]
    order = torch.argsort(key, dim=0, stable=True)
    r = torch.arange(n, dtype=out_dtype, device=f.device).view(n, *([1] * (f.dim() - 1))).expand(order.shape)
    return torch.empty(order.shape, dtype=out_dtype, device=f.device).scatter_(0, order, r)


def centred_ranks(f: torch.Tensor) -> torch.Tensor:
    """Ranks along dim 0 mapped linearly onto [−0.5, 0.5]: the smallest ``f`` gets −0.5 (OpenAI-ES, PGPE).

    Ties keep their order of appearance (stable), so the result is a deterministic function of ``f``.
    """
    return _ranks(f) / max(f.shape[0] - 1, 1) - 0.5


def nes_utilities(n: int, dtype: torch.dtype = torch.float64, device: Any = None) -> torch.Tensor:
    """NES utilities for ranks 1..n (best first): max(0, ln(n/2 + 1) − ln k), normalised, minus 1/n."""
    k = torch.arange(1, n + 1, dtype=dtype, device=device)
    u = (math.log(n / 2 + 1) - k.log()).clamp_min(0)
    return u / u.sum() - 1.0 / n


class FitnessShaping:
    """Base of the fitness shapings: ``shaping(f)`` → loss-like values along dim 0 (see the module docstring).

    Shapings take no arguments; a subclass defines ``__call__``.
    """

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CentredRanks(FitnessShaping):
    """Centred ranks in [−0.5, 0.5] (Salimans et al., 2017): invariant to any increasing transform of ``f``.

    No arguments. Ties keep their order of appearance; non-finite values rank last.
    """

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        return centred_ranks(f)


class Raw(FitnessShaping):
    """The fitness values themselves (the ES estimate is then the unbiased gradient of the smoothed objective).

    No arguments.
    """

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        return f if f.is_floating_point() else f.double()


class NESUtilities(FitnessShaping):
    """NES rank utilities u_k (Wierstra et al., 2014), negated to be loss-like: the best sample gets ``−u_1``.

    No arguments; ``u_k = max(0, ln(λ/2 + 1) − ln k) / Σ − 1/λ`` for rank k (best first).
    """

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        u = nes_utilities(f.shape[0], f.dtype if f.is_floating_point() else torch.float64, f.device)
        return -u[_ranks(f).long()]


SHAPINGS = {"centred_ranks": CentredRanks, "raw": Raw, "nes": NESUtilities}


def resolve_shaping(shaping: FitnessShaping | str | bool, name: str = "shaping") -> FitnessShaping:
    """A shaping object from an object, a name (``"centred_ranks"``, ``"raw"``, ``"nes"``) or a bool (ranks or raw)."""
    if isinstance(shaping, FitnessShaping):
        return shaping
    if isinstance(shaping, bool):
        return CentredRanks() if shaping else Raw()
    if isinstance(shaping, str) and shaping in SHAPINGS:
        return SHAPINGS[shaping]()
    raise ValueError(f"{name} must be a gradkit.search.shaping.FitnessShaping or one of {tuple(SHAPINGS)}, "
                     f"got {shaping!r}")


def es_weights(f: torch.Tensor, shaping: FitnessShaping, sigma: float = 1.0) -> torch.Tensor:
    """Coefficients ``F_j / (nσ)`` of the samples' noise ``ε_j`` in the ES gradient ``ĝ = Σ_j F_j ε_j / (nσ)``.

    ``f``: the population's fitness along dim 0 (trailing dimensions are kept). With a per-coordinate σ, pass
    ``sigma=1`` and divide the resulting ``Σ_j c_j ε_j`` by σ.
    """
    return shaping(f) / (f.shape[0] * float(sigma))
