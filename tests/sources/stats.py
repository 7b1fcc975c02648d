"""Statistical checks for gradient estimators: tolerances come from the sample's own standard errors."""

from __future__ import annotations

import math

import torch


def unbiasedness(samples: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Test statistics for ``E[samples] == target`` from ``n`` i.i.d. estimates (rows of ``samples``).

    * ``z_proj``: the estimates projected on ``target`` (``a_i = ĝ_i·g/‖g‖²``, expected mean 1), as a z-score
      of the sample mean; sensitive to a scale error.
    * ``chi2_excess``: ``Σ_j ((mean_j − g_j)/SE_j)²`` minus its expectation ``d``, in units of its standard
      deviation ``√(2d)``; sensitive to a bias in any coordinate.
    """
    samples = samples.double()
    target = target.double().reshape(-1)
    n, d = samples.shape
    a = samples @ target / float(target @ target)
    z_proj = (float(a.mean()) - 1.0) / (float(a.std()) / math.sqrt(n))
    se = samples.std(0) / math.sqrt(n)
    keep = se > 0
    chi2 = float((((samples.mean(0) - target)[keep] / se[keep]) ** 2).sum())
    dk = int(keep.sum())
    return {"z_proj": z_proj, "chi2_excess": (chi2 - dk) / math.sqrt(2 * dk), "n": n, "d": dk}


def assert_unbiased(samples: torch.Tensor, target: torch.Tensor, z: float = 4.0) -> dict[str, float]:
    """``|z_proj| ≤ z`` and ``chi2_excess ≤ z`` (a 4-sigma tolerance; seeds are fixed, so this is deterministic)."""
    st = unbiasedness(samples, target)
    assert abs(st["z_proj"]) <= z, f"projection on the true gradient is biased: {st}"
    assert st["chi2_excess"] <= z, f"some coordinates are biased: {st}"
    return st


def assert_detects_scale_error(samples: torch.Tensor, target: torch.Tensor, scale: float = 1.1) -> None:
    """The same test must reject an estimator that is off by ``scale`` (proves the tolerance is tight enough)."""
    try:
        assert_unbiased(samples * scale, target)
    except AssertionError:
        return
    st = unbiasedness(samples * scale, target)
    raise AssertionError(f"the unbiasedness test cannot see a {scale}x scale error: {st}")
