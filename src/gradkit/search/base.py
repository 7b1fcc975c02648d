"""The ask/tell searcher base: seeding, box bounds, fitness validation, best tracking, state_dict.

A searcher minimises. One generation is ``X = s.ask()`` (``[popsize, d]``), evaluate ``f`` on the rows,
``s.tell(X, f)``. Every random draw comes from the searcher's own ``torch.Generator``, so the whole state is
determined by ``seed`` and the sequence of ``tell`` calls: several processes running the same searcher with
the same fitness values ask for the same candidates (the distributed split of issue 8 relies on it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .._validate import NONFINITE_POLICIES, check_int, check_nonfinite, check_positive
from ..errors import NonFiniteError
from .mean_optim import MeanOptimizer, resolve_mean_optimizer

__all__ = ["NONFINITE_FITNESS", "Searcher"]

# "raise": NonFiniteError, nothing updated. "skip": the generation is dropped, state untouched, counted in
# ``n_skipped``. "worst": NaN/±Inf candidates are ranked behind every finite one (infeasible points).
# "ignore": no check; the values reach the method's update as they are (NaN ranks last in torch's sort).
NONFINITE_FITNESS = NONFINITE_POLICIES

TensorLike = torch.Tensor | Sequence[float] | float
Bounds = tuple[TensorLike, TensorLike] | None
Device = torch.device | str | None


def default_popsize(d: int) -> int:
    """Hansen's default population size ``4 + floor(3 ln d)``."""
    return 4 + int(3 * math.log(d))


class Searcher:
    """Base class of the ask/tell searchers (minimisation).

    Args:
        x0: initial mean m₀, a 1-D tensor (or sequence) of length ``d``.
        sigma0: initial step size σ₀ (> 0): a scalar, or for the diagonal searchers one value per coordinate.
        popsize: λ, candidates per ``ask()`` (default None: the method's default).
        bounds: optional box ``(lower, upper)``, scalars or length-``d`` tensors (default None). Candidates are
            sampled in the unbounded space and clipped into the box by ``ask()``; ``tell`` updates from the
            clipped (evaluated) points and projects the mean back into the box.
        seed: seed of the searcher's private ``torch.Generator`` (default None: drawn from torch's global RNG).
        on_nonfinite: what ``tell`` does with NaN/Inf fitness: ``"raise"`` (default: ``gk.NonFiniteError``,
            nothing updated), ``"skip"`` (drop the generation, counted in ``n_skipped``), ``"worst"`` (rank those
            candidates last), ``"ignore"`` (no check: the values reach the update as they are).
        dtype: dtype of the search distribution (default float64: covariance updates need it).
        device: its device (default: that of ``x0``).
    """

    paper: str = ""
    min_popsize: int = 2
    # Names of attributes (tensors, numbers) that make up the method's state, saved by ``state_dict``.
    _state_attrs: tuple[str, ...] = ()
    # Names of attributes holding stateful objects (their own ``state_dict``), e.g. the mean's optimizer.
    _state_objects: tuple[str, ...] = ()

    def __init__(self, x0: TensorLike, sigma0: TensorLike, *, popsize: int | None = None,
                 bounds: tuple[TensorLike, TensorLike] | None = None, seed: int | None = None,
                 on_nonfinite: str = "raise", dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        x0 = torch.as_tensor(x0, dtype=dtype, device=device).detach().clone()
        if x0.dim() != 1 or x0.numel() == 0:
            raise ValueError(f"x0 must be a non-empty 1-D tensor, got shape {tuple(x0.shape)}")
        if not torch.isfinite(x0).all():
            raise ValueError("x0 must be finite")
        self.dim = x0.numel()
        self.dtype, self.device = dtype, x0.device
        self.x0 = x0
        self.sigma0 = self._check_sigma(sigma0)
        if popsize is None:
            popsize = self.default_popsize(self.dim)
        self.popsize = check_int("popsize", popsize, self.min_popsize)
        self.on_nonfinite = check_nonfinite(on_nonfinite, NONFINITE_FITNESS, where=type(self).__name__)
        self.lower, self.upper = self._check_bounds(bounds)
        if self.lower is not None:
            x0.clamp_(self.lower, self.upper)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = check_int("seed", seed)
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self.generation = 0
        self.nfev = 0
        self.n_skipped = 0
        self.best_x = x0.clone()
        self.best_f = math.inf

    # ---- hooks for the methods -------------------------------------------------------------------------
    def default_popsize(self, d: int) -> int:
        return default_popsize(d)

    def _sample(self) -> torch.Tensor:
        """Draw ``[popsize, d]`` candidates (before clipping to the bounds); by default from N(m, diag σ²)."""
        return self.m + self.sigma * self._randn(self.popsize)

    def _randn(self, rows: int) -> torch.Tensor:
        """``[rows, d]`` standard normal draws from the searcher's generator."""
        return torch.randn(rows, self.dim, generator=self.generator, dtype=self.dtype, device=self.device)

    def _update(self, x: torch.Tensor, f: torch.Tensor) -> None:
        """Update the distribution from candidates ``x`` ``[n, d]`` and fitness ``f`` ``[n]``.

        ``f`` is finite unless ``on_nonfinite="ignore"``.
        """
        raise NotImplementedError

    @property
    def mean(self) -> torch.Tensor:
        """The centre ``m`` of the search distribution (a copy)."""
        return self.m.clone()

    def _stop_reasons(self) -> dict[str, Any]:
        return {}

    # ---- public API --------------------------------------------------------------------------------------
    def ask(self) -> torch.Tensor:
        """``[popsize, d]`` candidates to evaluate (a fresh tensor, inside the bounds when given)."""
        x = self._sample()
        if self.lower is not None:
            x = torch.maximum(torch.minimum(x, self.upper), self.lower)
        return x

    def tell(self, candidates: torch.Tensor, fitness: TensorLike) -> None:
        """Update from ``candidates`` ``[popsize, d]`` (as returned by ``ask``) and their ``fitness`` ``[popsize]``.

        The update is computed from the candidates passed here, so any rows may be told (e.g. repaired or
        injected points); rows far outside the sampling distribution take a correspondingly large step.
        """
        x, f = self._check_tell(candidates, fitness)
        bad = ~torch.isfinite(f)
        if self.on_nonfinite != "ignore" and bad.any():
            if self.on_nonfinite == "raise":
                raise NonFiniteError(f"fitness has {int(bad.sum())} non-finite value(s) (NaN/Inf); nothing updated. "
                                     "Pass on_nonfinite='skip' or 'worst' to continue.")
            if self.on_nonfinite == "skip":
                self.n_skipped += 1
                self.nfev += len(f)
                return
            if bad.all():
                raise NonFiniteError("every fitness value is non-finite; nothing to rank (on_nonfinite='worst')")
            # Rank them last while keeping the finite values' order: one above the worst finite value.
            worst = f[~bad].max()
            f = torch.where(bad, worst + worst.abs() + 1.0, f)
        self.nfev += len(f)
        finite = torch.where(bad, torch.full_like(f, math.inf), f)
        i = int(torch.argmin(finite))
        if float(finite[i]) < self.best_f:
            self.best_f = float(finite[i])
            self.best_x = x[i].clone()
        self._update(x, f)
        if self.lower is not None:
            # Gradient-style updates (SNES, PGPE, OpenAI-ES) can step the mean out of the box: project it back.
            self.m = torch.maximum(torch.minimum(self.m, self.upper), self.lower)
        self.generation += 1

    @property
    def best(self) -> tuple[torch.Tensor, float]:
        """``(x, f)``: the best candidate told so far (``f`` is ``inf`` before the first ``tell``)."""
        return self.best_x.clone(), self.best_f

    def stop(self) -> bool:
        """True once a termination criterion of the method holds (see ``stop_reasons``)."""
        return bool(self.stop_reasons())

    def stop_reasons(self) -> dict[str, Any]:
        """The termination criteria that hold now, with their values (empty while the search should go on)."""
        return self._stop_reasons()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run bit-exactly: the distribution, counters, best, RNG state."""
        state: dict[str, Any] = {}
        for k in ("generation", "nfev", "n_skipped", "best_f", "popsize", *self._state_attrs):
            v = getattr(self, k)
            state[k] = v.clone() if isinstance(v, torch.Tensor) else list(v) if isinstance(v, list) else v
        for k in self._state_objects:
            state[k] = getattr(self, k).state_dict()
        state["best_x"] = self.best_x.clone()
        state["rng_state"] = self.generator.get_state()
        state["dim"] = self.dim
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("dim") != self.dim:
            raise ValueError(f"state_dict is for dimension {state.get('dim')}, this searcher has {self.dim}")
        missing = [k for k in ("generation", "nfev", "best_f", "rng_state", *self._state_attrs, *self._state_objects)
                   if k not in state]
        if missing:
            raise ValueError(f"state_dict misses {missing}")
        for k, v in state.items():
            if k in ("rng_state", "dim"):
                continue
            if k in self._state_objects:
                getattr(self, k).load_state_dict(v)
                continue
            if isinstance(v, torch.Tensor):
                v = v.to(device=self.device, dtype=self.dtype if v.is_floating_point() else v.dtype).clone()
            setattr(self, k, v)
        self.generator.set_state(state["rng_state"])
        self._after_load()

    def _after_load(self) -> None:
        pass

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dim={self.dim}, popsize={self.popsize}, generation={self.generation}, "
                f"nfev={self.nfev}, best_f={self.best_f:.6g})")

    # ---- validation ----------------------------------------------------------------------------------------
    def _check_sigma(self, sigma0: TensorLike) -> torch.Tensor:
        s = torch.as_tensor(sigma0, dtype=self.dtype, device=self.device).detach().clone()
        if s.dim() > 1 or (s.dim() == 1 and s.numel() != self.dim):
            raise ValueError(f"sigma0 must be a scalar or have length {self.dim}, got shape {tuple(s.shape)}")
        if not (torch.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"sigma0 must be finite and > 0, got {sigma0!r}")
        return s

    def _check_bounds(self, bounds):
        if bounds is None:
            return None, None
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ValueError(f"bounds must be a pair (lower, upper), got {bounds!r}")
        lo, hi = (torch.as_tensor(b, dtype=self.dtype, device=self.device).expand(self.dim).clone()
                  for b in bounds)
        if torch.isnan(lo).any() or torch.isnan(hi).any() or not (lo < hi).all():
            raise ValueError("bounds must satisfy lower < upper in every coordinate")
        return lo, hi

    def _check_tell(self, candidates, fitness) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(candidates).to(device=self.device, dtype=self.dtype)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"candidates must have shape [n, {self.dim}], got {tuple(x.shape)}")
        if x.shape[0] != self.popsize:
            raise ValueError(f"candidates must hold popsize={self.popsize} rows (one ask()), got {x.shape[0]}")
        if not torch.isfinite(x).all():
            raise ValueError("candidates must be finite")
        f = torch.as_tensor(fitness).to(device=self.device, dtype=self.dtype).detach()
        if f.dim() == 2 and f.shape[1] == 1:
            f = f[:, 0]
        if f.shape != (x.shape[0],):
            raise ValueError(f"fitness must have shape [{x.shape[0]}] (one value per candidate), "
                             f"got {tuple(f.shape)}")
        return x, f


def check_sigma_scalar(sigma0: torch.Tensor) -> float:
    if sigma0.dim() != 0:
        raise ValueError("sigma0 must be a scalar for this searcher (scale x instead)")
    return check_positive("sigma0", float(sigma0))


class MirroredSearcher(Searcher):
    """A Gaussian search distribution N(m, diag(σ²)) sampled in mirrored pairs, whose mean moves by an optimizer.

    Shared by :class:`~gradkit.search.OpenAIES` and :class:`~gradkit.search.PGPE`: rows ``2i`` and ``2i+1`` of a
    generation are ``m + σ·ε_i`` and ``m − σ·ε_i``; the population is even. The mean's update rule is the
    :class:`~gradkit.search.mean_optim.MeanOptimizer` in ``self.mean_optimizer`` (``m ← m − step(g)``).

    Args:
        x0: initial mean m₀.
        sigma0: the noise scale σ (scalar or one per coordinate).
        optimizer: the mean's update rule, a :class:`~gradkit.search.mean_optim.MeanOptimizer` or ``"adam"`` /
            ``"sgd"`` (default ``"adam"``).
        default_lr: the learning rate given to an optimizer whose ``lr`` is None (default 1).
        kwargs: the :class:`~gradkit.search.Searcher` arguments.
    """

    _state_objects = ("mean_optimizer",)

    def __init__(self, x0: TensorLike, sigma0: TensorLike, *, optimizer: MeanOptimizer | str = "adam",
                 default_lr: float = 1.0, **kwargs: Any):
        super().__init__(x0, sigma0, **kwargs)
        if self.popsize % 2:
            raise ValueError(f"popsize must be even (mirrored pairs), got {self.popsize}")
        self.m = self.x0.clone()
        self.sigma = self.sigma0.expand(self.dim).clone()
        self.mean_optimizer = resolve_mean_optimizer(optimizer, default_lr)

    def default_popsize(self, d: int) -> int:
        n = default_popsize(d)
        return n + n % 2

    def _sample(self) -> torch.Tensor:
        eps = self.sigma * self._randn(self.popsize // 2)
        return torch.stack([self.m + eps, self.m - eps], 1).reshape(self.popsize, self.dim)

    def _descend(self, grad: torch.Tensor) -> None:
        """Move the mean down ``grad`` with the mean's optimizer."""
        self.m = self.m - self.mean_optimizer.step(grad)
