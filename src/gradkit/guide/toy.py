"""Exact test-bed: Gaussian-mixture data on the linear path, every quantity in closed form (float64, no training).

Data ``p1 = Σ_k π_k N(μ_k, Σ_k)``, noise ``x0 ~ N(0, I)``, ``x_t = (1−t)·x0 + t·x1``. Given component k,
``x_t ~ N(t·μ_k, S_k(t))`` with ``S_k(t) = (1−t)²·I + t²·Σ_k``, hence

    responsibilities  γ_k(x, t) = π_k N(x; tμ_k, S_k) / Σ_j π_j N(x; tμ_j, S_j)   (= the exact noise-aware classifier)
    velocity          v(x, t)  = Σ_k γ_k [μ_k + (tΣ_k − (1−t)I) S_k⁻¹ (x − tμ_k)]
    score             s(x, t)  = −Σ_k γ_k S_k⁻¹ (x − tμ_k)
    posterior of x1   given (x_t, k): mean μ_k + tΣ_k S_k⁻¹(x − tμ_k), covariance Σ_k − t²Σ_k S_k⁻¹ Σ_k

Classes are groups of components (sub-mixtures with renormalised weights); ``cond=None`` is the whole mixture. A
:class:`GMM` is itself a velocity model ``(x, t, cond) -> v`` for :func:`gradkit.guide.sample`. It also gives the
exact ancestral (stochastic) sampler for any time grid, the flow map Φ and its inverse, and the exactly tilted
mixtures of a linear or quadratic reward (targets for reward guidance and particle methods).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .._validate import check_int

Tensor = torch.Tensor
f64 = torch.float64

__all__ = ["GMM", "asymmetric", "gaussian", "ring"]


class GMM:
    """A Gaussian mixture with exact flow-matching quantities on the linear path.

    Args:
        weights: mixture weights π_k (``[K]``, normalised here).
        means: component means μ_k (``[K, d]``).
        covs: component covariances Σ_k: ``[K, d, d]`` full, ``[K, d]`` diagonal or ``[K]`` isotropic variances
            (symmetric positive definite).
        classes: the class label of each component (``[K]`` integers; default: component k is class k).

    The model contract: ``gmm(x, t, cond)`` is the exact velocity; ``cond`` is ``None`` (unconditional), an int
    class, or a ``[B]`` tensor of class labels (one per row).
    """

    prediction = "velocity"

    def __init__(self, weights: Sequence[float] | Tensor, means: Sequence | Tensor, covs: Sequence | Tensor,
                 classes: Sequence[int] | Tensor | None = None):
        w = torch.as_tensor(weights, dtype=f64).flatten()
        mu = torch.as_tensor(means, dtype=f64)
        if mu.ndim != 2 or mu.shape[0] != w.numel():
            raise ValueError(f"means must be [K, d] with K = len(weights) = {w.numel()}, got {tuple(mu.shape)}")
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        K, d = mu.shape
        cv = torch.as_tensor(covs, dtype=f64)
        if cv.ndim == 1:
            cv = cv[:, None, None] * torch.eye(d, dtype=f64)
        elif cv.ndim == 2:
            cv = torch.diag_embed(cv)
        if cv.shape != (K, d, d):
            raise ValueError(f"covs must be [K, d, d], [K, d] or [K], got {tuple(torch.as_tensor(covs).shape)}")
        cv = 0.5 * (cv + cv.transpose(1, 2))
        lam, U = torch.linalg.eigh(cv)
        if bool((lam <= 0).any()):
            raise ValueError("covs must be positive definite")
        self.weights = w / w.sum()
        self.means = mu
        self.covs = cv
        self._lam, self._U = lam, U  # Σ_k = U diag(λ) Uᵀ, so S_k(t) = U diag((1−t)² + t²λ) Uᵀ
        self._diagonal = bool(torch.equal(cv, torch.diag_embed(torch.diagonal(cv, dim1=1, dim2=2))))
        if self._diagonal:  # eigenbasis = the coordinate axes: skip the rotations (the common, fast case)
            self._lam = torch.diagonal(cv, dim1=1, dim2=2).clone()
            self._U = torch.eye(d, dtype=f64).expand(K, d, d).clone()
        if classes is None:
            cl = torch.arange(K)
        else:
            cl = torch.as_tensor(classes, dtype=torch.long).flatten()
            if cl.numel() != K or bool((cl < 0).any()):
                raise ValueError(f"classes must hold K = {K} non-negative integers")
        self.classes = cl
        self.num_classes = int(cl.max()) + 1

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def __repr__(self) -> str:
        return f"GMM(K={self.num_components}, d={self.dim}, classes={self.num_classes})"

    def _log_weights(self, cond: Any, batch: int) -> Tensor:
        """``[B, K]`` log mixture weights restricted to each row's class (−inf outside), renormalised."""
        logw = torch.log(self.weights)
        if cond is None:
            return logw.expand(batch, -1)
        c = torch.as_tensor(cond, dtype=torch.long)
        if c.ndim == 0:
            c = c.expand(batch)
        if c.shape != (batch,):
            raise ValueError(f"cond must be None, an int or a [B] tensor of labels, got shape {tuple(c.shape)}")
        if bool((c < 0).any()) or bool((c >= self.num_classes).any()):
            raise ValueError(f"class labels must lie in [0, {self.num_classes})")
        mask = c.to(self.classes.device)[:, None] == self.classes[None, :]
        lw = torch.where(mask, logw.expand(batch, -1), torch.full_like(logw, -math.inf).expand(batch, -1))
        return lw - torch.logsumexp(lw, dim=1, keepdim=True)

    def _diag(self, t: Tensor) -> Tensor:
        """``[B, K, d]`` eigenvalues of S_k(t) for each row's t."""
        t = t.reshape(-1, 1, 1)
        return (1 - t) ** 2 + t * t * self._lam[None]

    @staticmethod
    def _t(t: Any, x: Tensor) -> Tensor:
        tt = torch.as_tensor(t, dtype=f64)
        return tt.expand(x.shape[0]) if tt.ndim == 0 else tt.to(f64).reshape(x.shape[0])

    def _parts(self, x: Tensor, t: Any):
        """Per-row/component pieces in float64: residual r = x − tμ_k in the eigenbases, S eigenvalues, logN."""
        xd = x.to(f64)
        tt = self._t(t, x)
        r = xd[:, None, :] - tt[:, None, None] * self.means[None]            # [B, K, d]
        rU = self._rot(r)                                                    # coordinates in Σ_k's eigenbasis
        s = self._diag(tt)                                                   # [B, K, d]
        logn = -0.5 * ((rU * rU / s).sum(-1) + torch.log(s).sum(-1) + self.dim * math.log(2 * math.pi))
        return xd, tt, rU, s, logn

    def _rot(self, r: Tensor) -> Tensor:
        """``[B, K, d]`` vectors into each component's eigenbasis (Uᵀ r)."""
        return r if self._diagonal else (r.unsqueeze(-2) @ self._U[None]).squeeze(-2)

    def _unrot(self, r: Tensor) -> Tensor:
        """Back from the eigenbases (U r)."""
        return r if self._diagonal else (self._U[None] @ r.unsqueeze(-1)).squeeze(-1)

    def log_responsibilities(self, x: Tensor, t: Any, cond: Any = None) -> Tensor:
        """``[B, K]`` log γ_k(x, t) (within the row's class when ``cond`` is given)."""
        _, _, _, _, logn = self._parts(x, t)
        lw = self._log_weights(cond, x.shape[0]) + logn
        return lw - torch.logsumexp(lw, dim=1, keepdim=True)

    def responsibilities(self, x: Tensor, t: Any, cond: Any = None) -> Tensor:
        return self.log_responsibilities(x, t, cond).exp()

    def log_prob(self, x: Tensor, t: Any = 1.0, cond: Any = None) -> Tensor:
        """``[B]`` log p_t(x | cond) (``t = 1``: the data density)."""
        _, _, _, _, logn = self._parts(x, t)
        return torch.logsumexp(self._log_weights(cond, x.shape[0]) + logn, dim=1).to(x.dtype)

    def class_log_probs(self, x: Tensor, t: Any) -> Tensor:
        """``[B, C]`` log p_t(c | x) for every class: the exact noise-aware classifier (differentiable)."""
        lg = self.log_responsibilities(x, t)
        member = self.classes[None, :] == torch.arange(self.num_classes)[:, None]          # [C, K]
        logmask = torch.zeros(member.shape, dtype=f64).masked_fill(~member, -math.inf)
        return torch.logsumexp(lg[:, None, :] + logmask[None], dim=2).to(x.dtype)

    def classifier(self, x: Tensor, t: Any) -> Tensor:
        """Alias of :meth:`class_log_probs`, usable as the ``classifier(x, t) -> logits`` of classifier guidance."""
        return self.class_log_probs(x, t)

    # ------------------------------------------------------------------ predictions
    def _per_component(self, x: Tensor, t: Any, cond: Any):
        xd, tt, rU, s, logn = self._parts(x, t)
        lw = self._log_weights(cond, x.shape[0]) + logn
        gam = (lw - torch.logsumexp(lw, dim=1, keepdim=True)).exp()        # [B, K]
        sinv_r = self._unrot(rU / s)                                         # S_k⁻¹ (x − tμ_k)
        return xd, tt, gam, rU, s, sinv_r

    def velocity(self, x: Tensor, t: Any, cond: Any = None) -> Tensor:
        """Exact velocity ``E[x1 − x0 | x_t = x, cond]``."""
        xd, tt, gam, rU, s, _ = self._per_component(x, t, cond)
        tb = tt[:, None, None]
        # (tΣ − (1−t)I) S⁻¹ r  in Σ's eigenbasis: (tλ − (1−t)) / s
        coef = (tb * self._lam[None] - (1 - tb)) / s
        vk = self.means[None] + self._unrot(coef * rU)
        return (gam[..., None] * vk).sum(1).to(x.dtype)

    __call__ = velocity

    def score(self, x: Tensor, t: Any, cond: Any = None) -> Tensor:
        """Exact score ``∇_x log p_t(x | cond)``."""
        _, _, gam, _, _, sinv_r = self._per_component(x, t, cond)
        return (-(gam[..., None] * sinv_r).sum(1)).to(x.dtype)

    def x1_hat(self, x: Tensor, t: Any, cond: Any = None) -> Tensor:
        """Exact data prediction ``E[x1 | x_t = x, cond]``."""
        m, gam, _ = self._posterior_means(x, t, cond)
        return (gam[..., None] * m).sum(1).to(x.dtype)

    def _posterior_means(self, x, t, cond):
        xd, tt, gam, rU, s, _ = self._per_component(x, t, cond)
        tb = tt[:, None, None]
        m = self.means[None] + self._unrot(tb * self._lam[None] * rU / s)
        return m, gam, tt

    def posterior(self, x: Tensor, t: Any, cond: Any = None) -> tuple[Tensor, Tensor, Tensor]:
        """The posterior of x1 given ``x_t = x``: a mixture with weights γ ``[B, K]``, means ``[B, K, d]`` and
        covariances ``[B, K, d, d]`` (``Σ_k − t²Σ_k S_k⁻¹ Σ_k``)."""
        m, gam, tt = self._posterior_means(x, t, cond)
        s = self._diag(tt)
        ev = self._lam[None] - (tt[:, None, None] ** 2) * self._lam[None] ** 2 / s     # [B, K, d]
        cov = torch.einsum("kde,bke,kfe->bkdf", self._U, ev, self._U)
        return gam, m, cov

    # ------------------------------------------------------------------ sampling
    def _gen(self, generator: torch.Generator | None, seed: int | None) -> torch.Generator:
        if generator is not None:
            return generator
        g = torch.Generator()
        g.manual_seed(0 if seed is None else seed)
        return g

    def sample(self, n: int, cond: Any = None, *, generator: torch.Generator | None = None,
               seed: int | None = None) -> tuple[Tensor, Tensor]:
        """``n`` exact draws of the data ``x1`` (float64) and their components."""
        check_int("n", n, 1)
        g = self._gen(generator, seed)
        lw = self._log_weights(cond, n)
        k = torch.multinomial(lw.exp(), 1, generator=g).squeeze(1)
        z = torch.randn(n, self.dim, dtype=f64, generator=g)
        x = self.means[k] + torch.einsum("nde,ne->nd", self._U[k], self._lam[k].sqrt() * z)
        return x, k

    def ancestral(self, x: Tensor, times: Sequence[float] | Tensor, cond: Any = None, *,
                  generator: torch.Generator | None = None, seed: int | None = None) -> Tensor:
        """Exact stochastic sampler: from ``x`` at ``times[0]`` to ``times[-1]`` through the exact reverse kernels.

        For ``t < t′`` the forward kernel is ``x_t | x_t′ ~ N(a·x_t′, c²I)``, ``a = t/t′``,
        ``c² = (1−t)² − a²(1−t′)²``; the reverse draws ``k ~ γ(x_t, t)`` then
        ``x_t′ ~ N(P(S_k(t′)⁻¹ t′μ_k + (a/c²)x_t), P)``, ``P = (S_k(t′)⁻¹ + (a²/c²)I)⁻¹``. Any number of steps gives
        exact marginals (no discretisation error), so tests of particle methods measure the algorithm only.
        """
        tt = torch.as_tensor(times, dtype=f64).flatten()
        if tt.numel() < 2 or not bool((tt[1:] > tt[:-1]).all()):
            raise ValueError("times must increase")
        g = self._gen(generator, seed)
        xd = x.to(f64)
        n = xd.shape[0]
        for t, tn in zip(tt[:-1].tolist(), tt[1:].tolist()):
            gam = self.log_responsibilities(xd, t, cond).exp()
            k = torch.multinomial(gam, 1, generator=g).squeeze(1)
            a = t / tn
            c2 = (1 - t) ** 2 - a * a * (1 - tn) ** 2
            lam, U = self._lam[k], self._U[k]                                 # [n, d], [n, d, d]
            s = (1 - tn) ** 2 + tn * tn * lam
            if c2 <= 0:  # t = 0 … the kernel is degenerate only when t = t′
                raise ValueError("times must be strictly increasing")
            p = 1.0 / (1.0 / s + a * a / c2)                                  # eigenvalues of P
            rhs = tn * self.means[k] / 1.0
            rhs_u = torch.einsum("nde,nd->ne", U, rhs) / s + torch.einsum("nde,nd->ne", U, (a / c2) * xd)
            mean_u = p * rhs_u
            z = torch.randn(n, self.dim, dtype=f64, generator=g)
            xd = torch.einsum("nde,ne->nd", U, mean_u + p.sqrt() * z)
        return xd.to(x.dtype)

    def flow_map(self, x: Tensor, t0: float = 0.0, t1: float = 1.0, cond: Any = None, *, steps: int = 400) -> Tensor:
        """The ODE flow map Φ_{t0→t1}(x) (``t1 < t0``: the inverse map Φ⁻¹).

        Closed form for a single Gaussian (``x_t1 = t1·μ + S(t1)^{1/2} S(t0)^{-1/2}(x − t0·μ)``, as S(t) commutes
        with Σ); otherwise RK4 on the exact velocity with ``steps`` steps (error O(h⁴): the forward∘inverse round
        trip measures it).
        """
        if self.num_components == 1:
            xd = x.to(f64)
            lam, U, mu = self._lam[0], self._U[0], self.means[0]
            s0 = (1 - t0) ** 2 + t0 * t0 * lam
            s1 = (1 - t1) ** 2 + t1 * t1 * lam
            y = torch.einsum("de,nd->ne", U, xd - t0 * mu) * (s1 / s0).sqrt()
            return (t1 * mu + torch.einsum("de,ne->nd", U, y)).to(x.dtype)
        from .sampler import sample

        return sample(self, x.to(f64), cond=cond, method="rk4", steps=steps, t_start=t0, t_end=t1).to(x.dtype)

    # ------------------------------------------------------------------ moments, sub-mixtures, tilts
    def mean(self, cond: Any = None) -> Tensor:
        w = self._log_weights(cond, 1)[0].exp()
        return (w[:, None] * self.means).sum(0)

    def cov(self, cond: Any = None) -> Tensor:
        w = self._log_weights(cond, 1)[0].exp()
        m = (w[:, None] * self.means).sum(0)
        dm = self.means - m
        return (w[:, None, None] * (self.covs + dm[:, :, None] * dm[:, None, :])).sum(0)

    def component_weights(self, cond: Any = None) -> Tensor:
        """``[K]`` mixture weights (renormalised within a class when ``cond`` is an int)."""
        return self._log_weights(cond, 1)[0].exp()

    def subset(self, c: int) -> GMM:
        """The class-``c`` sub-mixture as its own :class:`GMM` (all its components in class 0)."""
        keep = self.classes == int(c)
        if not bool(keep.any()):
            raise ValueError(f"no component has class {c}")
        return GMM(self.weights[keep], self.means[keep], self.covs[keep])

    def tilt_linear(self, a: Sequence[float] | Tensor, lam: float = 1.0) -> GMM:
        """The mixture ∝ ``p1(x)·exp(λ·aᵀx)``: weights ``π_k exp(λaᵀμ_k + ½λ²aᵀΣ_k a)``, means ``μ_k + λΣ_k a``,
        covariances unchanged."""
        a = torch.as_tensor(a, dtype=f64)
        Sa = self.covs @ a
        logw = torch.log(self.weights) + lam * self.means @ a + 0.5 * lam * lam * (Sa @ a)
        return GMM(torch.softmax(logw, 0), self.means + lam * Sa, self.covs, self.classes)

    def tilt_quadratic(self, Q: Sequence | Tensor, b: Sequence[float] | Tensor, lam: float = 1.0) -> GMM:
        """The mixture ∝ ``p1(x)·exp(−½λ(x − b)ᵀQ(x − b))`` (Q symmetric positive semi-definite):
        ``Σ′ = (Σ⁻¹ + λQ)⁻¹``, ``μ′ = Σ′(Σ⁻¹μ + λQb)``, ``π′ ∝ π·det(I + λΣQ)^{-1/2}·exp(−½ δᵀ λQ(I + λΣQ)⁻¹ δ)``,
        ``δ = μ − b``."""
        Q = torch.as_tensor(Q, dtype=f64)
        b = torch.as_tensor(b, dtype=f64)
        A = lam * Q
        eye = torch.eye(self.dim, dtype=f64)
        inv = torch.linalg.inv(self.covs)
        cov2 = torch.linalg.inv(inv + A)
        mu2 = torch.einsum("kde,ke->kd", cov2, torch.einsum("kde,ke->kd", inv, self.means) + (A @ b)[None])
        M = eye + self.covs @ A
        dlt = self.means - b
        quad = torch.einsum("kd,kd->k", dlt, torch.einsum("de,kef->kdf", A, torch.linalg.inv(M)).matmul(
            dlt[..., None]).squeeze(-1))
        logw = torch.log(self.weights) - 0.5 * torch.logdet(M) - 0.5 * quad
        return GMM(torch.softmax(logw, 0), mu2, cov2, self.classes)


def gaussian(mean: Sequence[float] | Tensor, cov: Sequence | Tensor | float) -> GMM:
    """A single Gaussian ``N(mean, cov)`` as a :class:`GMM` (``cov`` a matrix, a vector of variances or a
    variance)."""
    m = torch.as_tensor(mean, dtype=f64).reshape(1, -1)
    c = torch.as_tensor(cov, dtype=f64)
    if c.ndim == 0:
        c = c.reshape(1)
    else:
        c = c.unsqueeze(0)
    return GMM([1.0], m, c)


def ring(n: int = 8, radius: float = 4.0, std: float = 0.3, *, classes: str | Sequence[int] = "components") -> GMM:
    """``n`` equal-weight isotropic Gaussians on a circle (2-D). ``classes``: ``"components"`` (each its own
    class), ``"parity"`` (even / odd components: two classes of ``n/2`` modes) or explicit labels."""
    check_int("n", n, 1)
    ang = torch.arange(n, dtype=f64) * (2 * math.pi / n)
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    if classes == "components":
        cl = None
    elif classes == "parity":
        cl = torch.arange(n) % 2
    elif isinstance(classes, str):
        raise ValueError(f"classes must be 'components', 'parity' or a list of labels, got {classes!r}")
    else:
        cl = classes
    return GMM(torch.full((n,), 1.0 / n, dtype=f64), means, torch.full((n,), std * std, dtype=f64), cl)


def asymmetric() -> GMM:
    """Two 2-D components with unequal weights and full covariances (classes 0 and 1)."""
    return GMM([0.7, 0.3], [[-1.0, 0.5], [2.0, -1.0]],
               [[[0.5, 0.2], [0.2, 0.3]], [[0.2, -0.1], [-0.1, 0.6]]])
