"""Approximate orthogonalisation of matrices by a quintic Newton–Schulz iteration (the matrix kernel of Muon).

For G = U·S·Vᵀ, X₀ = G/‖G‖_F and X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ apply the odd polynomial
φ(s) = a·s + b·s³ + c·s⁵ to every singular value while keeping U and V. With Keller Jordan's coefficients
(3.4445, −4.7750, 2.0315) five iterations send every singular value above ~1e-3·‖G‖_F into a band around 1
(see :func:`singular_value_band`) rather than exactly to 1: the steep slope at 0 buys speed over precision.

Matrices of one shape are stacked and iterated together by batched matmuls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NS_COEFFICIENTS", "newton_schulz", "newton_schulz_many", "ns_polynomial", "singular_value_band"]

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients: Sequence[float] = NS_COEFFICIENTS,
                  eps: float = 1e-7) -> torch.Tensor:
    """≈ U·Vᵀ of each matrix in ``G`` (shape ``(..., m, n)``); computed in float32 at least, returned in G's dtype.

    Args:
        G: Matrices ``(..., m, n)``.
        steps: Iterations. Default 5.
        coefficients: (a, b, c) of the quintic. Default Keller Jordan's.
        eps: Added to the Frobenius norm before dividing. Default 1e-7.
    """
    if G.ndim < 2:
        raise ValueError(f"G must have at least 2 dimensions, got shape {tuple(G.shape)}")
    a, b, c = coefficients
    X = G.float() if G.dtype in (torch.float16, torch.bfloat16) else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    # Iterate on the wide orientation: X·Xᵀ is then the smaller Gram matrix.
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c) if A.ndim == 3 else b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def newton_schulz_many(mats: Sequence[torch.Tensor], steps: int = 5,
                       coefficients: Sequence[float] = NS_COEFFICIENTS, eps: float = 1e-7) -> list[torch.Tensor]:
    """:func:`newton_schulz` of each 2-D matrix, matrices of equal shape/dtype/device batched into one stack.

    Args:
        mats: Matrices of any shapes.
        steps: Iterations. Default 5.
        coefficients: (a, b, c) of the quintic.
        eps: Added to the Frobenius norm before dividing.
    """
    out: list[torch.Tensor | None] = [None] * len(mats)
    index: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        index.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    for idx in index.values():
        if len(idx) == 1:
            out[idx[0]] = newton_schulz(mats[idx[0]], steps, coefficients, eps)
            continue
        res = newton_schulz(torch.stack([mats[i] for i in idx]), steps, coefficients, eps)
        for j, i in enumerate(idx):
            out[i] = res[j]
    return out  # type: ignore[return-value]


def ns_polynomial(s: torch.Tensor, steps: int = 5, coefficients: Sequence[float] = NS_COEFFICIENTS) -> torch.Tensor:
    """What the iteration does to a normalised singular value ``s`` = σ/‖G‖_F (the scalar map, iterated).

    Args:
        s: Normalised singular values.
        steps: Iterations. Default 5.
        coefficients: (a, b, c) of the quintic.
    """
    a, b, c = coefficients
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def singular_value_band(steps: int = 5, coefficients: Sequence[float] = NS_COEFFICIENTS, smallest: float = 1e-3
                        ) -> tuple[float, float]:
    """(min, max) of the output singular values over inputs σ/‖G‖_F in [``smallest``, 1].

    Args:
        steps: Iterations. Default 5.
        coefficients: (a, b, c) of the quintic.
        smallest: Smallest normalised singular value considered. Default 1e-3.
    """
    s = torch.logspace(torch.log10(torch.tensor(smallest)).item(), 0.0, 200_001, dtype=torch.float64)
    out = ns_polynomial(s, steps, coefficients)
    return float(out.min()), float(out.max())
