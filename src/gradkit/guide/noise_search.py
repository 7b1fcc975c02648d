"""Noise search — the sampler's input noise x0 (or a low-dimensional subspace of it) as the parameters of gradkit's
own optimisers: a ``gk.Pipeline`` (any ``gk.sources`` gradient source, any ``gk.transforms``, any optimizer) or an
ask/tell ``gk.search`` searcher.

A composition, not a single paper; it generalises the noise optimisation of "D-Flow: Differentiating through Flows
for Controlled Generation" (Ben-Hamu et al., 2024) and "End-to-End Diffusion Latent Optimization Improves
Classifier Guidance" (DOODL, Wallace et al., 2023) to estimated or no gradients. With Φ the (deterministic) sampler
and an optional subspace ``x0 = x̄0 + U·z`` (U a fixed random orthonormal basis, ``[D, k]``):

    minimise over z:   L(Φ(x̄0 + U·z))          by   z ← optimizer(z, source-estimate of ∇_z)   or   ask/tell

``Backprop`` differentiates through the solve (D-Flow's gradient); ``SPSA`` / ``ES`` / ``ForwardGradient`` need
only evaluations of Φ and L, so L may be a black box; CMA-ES / SNES / CEM search the same space without any
gradient. Across ranks, the zeroth-order sources split their directions and :func:`gradkit.search.minimize` its
candidates (``distributed=True``); only scalars travel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._validate import check_int, check_positive
from ..errors import NonFiniteError
from ._inputs import FlowMap, InputOptResult, check_objective, per_sample
from .base import Guidance, index_cond

Tensor = torch.Tensor
f64 = torch.float64

__all__ = ["NoiseSearch"]


class _Variables(torch.nn.Module):
    """The search variables as the one parameter ``z`` of a module (what every gk.sources source accepts)."""

    def __init__(self, init: Tensor):
        super().__init__()
        self.z = torch.nn.Parameter(init)


class NoiseSearch:
    """Optimise or search the input noise of a deterministic sampler.

    Args:
        loss: ``loss(x1) -> [B]`` to minimise (to maximise a reward pass ``lambda x: -reward(x)``); a black box
            is fine except with the ``Backprop`` source.
        steps: solver steps of Φ (default 20).
        method: the ODE solver (default ``"euler"``).
        guidance: a rule-level guidance in Φ (default none; e.g. ``CFG(w)``).
        subspace: k, search ``x0 = x̄0 + U·z`` with U a random orthonormal ``[D, k]`` basis (default None: all of
            x0, D dimensions).
        basis_seed: seed of U (default 0).
        on_nonfinite: ``"raise"`` (default) or ``"worst"`` (searchers only: a non-finite candidate ranks last).
    """

    paper = ("D-Flow: Differentiating through Flows for Controlled Generation; End-to-End Diffusion Latent "
             "Optimization Improves Classifier Guidance")

    def __init__(self, loss: Callable[[Tensor], Tensor], *, steps: int = 20, method: str = "euler",
                 guidance: Guidance | None = None, subspace: int | None = None, basis_seed: int = 0,
                 on_nonfinite: str = "raise"):
        self.loss = check_objective("loss", loss)
        self.flow = FlowMap(steps=steps, method=method, guidance=guidance)
        self.subspace = None if subspace is None else check_int("subspace", subspace, 1)
        self.basis_seed = check_int("basis_seed", basis_seed, 0)
        from .._validate import check_nonfinite

        self.on_nonfinite = check_nonfinite(on_nonfinite, ("raise", "worst"), where="NoiseSearch")

    # ------------------------------------------------------------------ the parameterisation
    def basis(self, dim: int, dtype: torch.dtype = f64) -> Tensor | None:
        """``[D, k]`` orthonormal basis of the subspace (None without one).

        Args:
            dim: D, the number of elements of one sample.
            dtype: the basis dtype (default float64).
        """
        if self.subspace is None:
            return None
        if self.subspace > dim:
            raise ValueError(f"subspace must be <= the sample dimension {dim}, got {self.subspace}")
        g = torch.Generator().manual_seed(self.basis_seed)
        q, _ = torch.linalg.qr(torch.randn(dim, self.subspace, dtype=f64, generator=g))
        return q.to(dtype)

    def decode(self, z: Tensor, x_bar: Tensor, basis: Tensor | None) -> Tensor:
        """x0 from the search variables: ``x̄0 + U·z`` (or z itself without a subspace).

        Args:
            z: ``[n, k]`` (subspace) or ``[n, ...]`` search variables.
            x_bar: ``[n, ...]`` or ``[1, ...]`` centre x̄0.
            basis: U, or None.
        """
        if basis is None:
            return z
        return x_bar + (z @ basis.T).reshape(z.shape[0], *x_bar.shape[1:])

    def _loss(self, model: Any, x0: Tensor, cond: Any, grad: bool) -> Tensor:
        return per_sample(self.loss(self.flow(model, x0, cond, grad=grad)), x0.shape[0])

    # ------------------------------------------------------------------ gradient route: a gk.Pipeline
    def optimize(self, model: Any, x0: Tensor, cond: Any = None, *, source: Callable | None = None,
                 optimizer: Callable | None = None, transforms: Sequence[Any] = (), iters: int = 100,
                 per_sample_closure: bool | None = None) -> InputOptResult:
        """Run ``iters`` steps of a ``gk.Pipeline`` whose parameters are the search variables.

        Args:
            model: the flow model.
            x0: initial noises ``[B, ...]`` (also the subspace centre x̄0).
            cond: the condition.
            source: factory ``source(module) -> gk.sources.Source`` on a module holding the search variables as
                its one parameter ``z`` (default ``gk.sources.Backprop``; e.g.
                ``functools.partial(gk.sources.SPSA, eps=1e-3, n_directions=4, seed=0)``).
            optimizer: factory ``optimizer([z]) -> torch.optim.Optimizer`` (default
                ``torch.optim.Adam(lr=0.05)``; any ``gk.optim`` optimizer).
            transforms: ``gk.transforms`` between source and optimizer (default none).
            iters: pipeline steps (default 100).
            per_sample_closure: the closure returns the ``[B]`` per-sample losses, so a perturbation source gives
                each row its own directions and its estimate uses that row's loss only; False hands
                the source their sum (one direction over the whole batch: every row's estimate then carries the
                other rows' noise). Default None: per-sample unless the source splits its directions across
                ranks (per-sample losses are not split across ranks).
        """
        from .. import sources as S
        from ..pipeline import Pipeline

        check_int("iters", iters, 0)
        self.flow.nfe, self.flow.evaluations = 0.0, 0
        U = self.basis(x0[0].numel(), x0.dtype)
        x_bar = x0.detach().clone()
        init = torch.zeros(x0.shape[0], self.subspace, dtype=x0.dtype) if U is not None else x_bar.clone()
        holder = _Variables(init)   # a module: every source accepts one (ForwardGradient needs one)
        src = (source or S.Backprop)(holder)
        opt = optimizer([holder.z]) if optimizer is not None else torch.optim.Adam([holder.z], lr=0.05)
        pipe = Pipeline(source=src, transforms=list(transforms), optimizer=opt)
        if per_sample_closure is None:
            per_sample_closure = getattr(src, "comm", None) is None
        # perturbation sources (SPSA, ES, ...) only evaluate: no graph; Backprop / ForwardGradient need one
        exact = not hasattr(src, "perturbation")

        def closure() -> Tensor:
            vals = self._loss(model, self.decode(holder.z, x_bar, U), cond, grad=exact)
            return vals if per_sample_closure else vals.sum()

        history = []
        for _ in range(iters):
            loss = pipe.step(closure)
            history.append(float(torch.as_tensor(loss).detach().sum()))
        with torch.no_grad():
            x_opt = self.decode(holder.z.detach(), x_bar, U).clone()
            x1 = self.flow(model, x_opt, cond)
            final = per_sample(self.loss(x1), x_opt.shape[0]).detach().to(f64)
        history.append(float(final.sum()))
        return InputOptResult(x0=x_opt, x1=x1, loss=final, history=history, nfe=self.flow.nfe,
                              evaluations=self.flow.evaluations, info={"z": holder.z.detach().clone(),
                                                                       "pipeline": pipe})

    # ------------------------------------------------------------------ search route: gk.search
    def search(self, model: Any, x0: Tensor, cond: Any = None, *, method: str | type = "cmaes",
               sigma0: float = 1.0, budget: int = 1000, seed: int = 0, distributed: bool | Any = False,
               **options: Any) -> InputOptResult:
        """Minimise each sample's loss over its search variables with :func:`gradkit.search.minimize`.

        Args:
            model: the flow model.
            x0: initial noises ``[B, ...]`` (the search starts there; also the subspace centre).
            cond: the condition.
            method: a :func:`~gradkit.search.minimize` method name (``"cmaes"`` default, ``"sep_cmaes"``,
                ``"snes"``, ``"cem"``, ``"pgpe"``, ``"openai_es"``) or a :class:`~gradkit.search.Searcher` class.
            sigma0: initial step size (default 1.0: the noise's own scale).
            budget: flow evaluations per sample (default 1000).
            seed: searcher seed; sample b uses ``seed + b`` (default 0).
            distributed: split each generation's candidates over ranks (``True`` or a
                :class:`gradkit.distributed.Comm`; default False).
            **options: passed to the searcher (``popsize``, ...).
        """
        from ..search import minimize

        check_positive("sigma0", sigma0)
        self.flow.nfe, self.flow.evaluations = 0.0, 0
        U = self.basis(x0[0].numel(), x0.dtype)
        results, xs, losses, history = [], [], [], []
        nfe = 0.0
        for b in range(x0.shape[0]):
            x_bar = x0[b:b + 1].detach()
            start = torch.zeros(self.subspace, dtype=f64) if U is not None else x_bar.reshape(-1).to(f64)
            evals = [0.0]

            def f(Z: Tensor, x_bar: Tensor = x_bar, b: int = b, evals: list = evals) -> Tensor:
                Zt = Z.to(x0.dtype)
                cand = self.decode(Zt, x_bar, U) if U is not None else Zt.reshape(-1, *x0.shape[1:])
                c = index_cond(cond, torch.full((cand.shape[0],), b, dtype=torch.long))
                before = self.flow.nfe
                with torch.no_grad():
                    vals = per_sample(self.loss(self.flow(model, cand, c)), cand.shape[0]).to(f64)
                evals[0] += (self.flow.nfe - before) * cand.shape[0]
                if self.on_nonfinite == "raise" and not bool(torch.isfinite(vals).all()):
                    raise NonFiniteError(f"non-finite loss for {int((~torch.isfinite(vals)).sum())} candidate(s) of "
                                         f"sample {b}")
                return vals

            opts = dict(options)
            if self.on_nonfinite == "worst":
                opts.setdefault("on_nonfinite", "worst")
            res = minimize(f, start, sigma0, method, budget=budget, seed=seed + b, distributed=distributed, **opts)
            results.append(res)
            z = res.x.to(x0.dtype)
            xs.append(self.decode(z[None], x_bar, U) if U is not None else z.reshape(1, *x0.shape[1:]))
            losses.append(res.fun)
            history.append(res.history)
            nfe += evals[0]
        x_opt = torch.cat(xs)
        with torch.no_grad():
            x1 = self.flow(model, x_opt, cond)
        return InputOptResult(x0=x_opt, x1=x1, loss=torch.tensor(losses, dtype=f64),
                              history=[sum(v) for v in zip(*[[f for _, f in h] for h in history])] if history
                              else [], nfe=nfe / x0.shape[0], evaluations=int(sum(r.nfev for r in results)),
                              info={"results": results})
