"""Classic test functions, batched: ``f(x)`` takes ``[..., d]`` and returns ``[...]``; minimum 0.

``sphere`` Σ x², ``ellipsoid`` Σ c^{(i−1)/(d−1)} x_i² (condition ``c``, 1e6 by default), ``rosenbrock``
Σ 100 (x_{i+1} − x_i²)² + (1 − x_i)² (minimum at 1), ``rastrigin`` 10 d + Σ x² − 10 cos(2π x) (multimodal).
"""

from __future__ import annotations

import math

import torch

__all__ = ["ellipsoid", "rastrigin", "rosenbrock", "sphere"]


def sphere(x: torch.Tensor) -> torch.Tensor:
    """Σ x² over the last dimension.

    Args:
        x: points ``[..., d]``.
    """
    return (x * x).sum(-1)


def ellipsoid(x: torch.Tensor, condition: float = 1e6) -> torch.Tensor:
    """Σ c^{(i−1)/(d−1)} x_i² over the last dimension.

    Args:
        x: points ``[..., d]``.
        condition: c, the ratio of the largest to the smallest axis weight (default 1e6).
    """
    d = x.shape[-1]
    if d == 1:
        return (x * x).sum(-1)
    scale = condition ** (torch.arange(d, dtype=x.dtype, device=x.device) / (d - 1))
    return (scale * x * x).sum(-1)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """Σ 100 (x_{i+1} − x_i²)² + (1 − x_i)² over the last dimension (minimum 0 at x = 1).

    Args:
        x: points ``[..., d]``, d ≥ 2.
    """
    a, b = x[..., :-1], x[..., 1:]
    return (100 * (b - a * a) ** 2 + (1 - a) ** 2).sum(-1)


def rastrigin(x: torch.Tensor) -> torch.Tensor:
    """10 d + Σ x² − 10 cos(2π x) over the last dimension (multimodal; minimum 0 at x = 0).

    Args:
        x: points ``[..., d]``.
    """
    d = x.shape[-1]
    return 10 * d + (x * x - 10 * torch.cos(2 * math.pi * x)).sum(-1)
