"""``minimize(f, x0, sigma0, method=...)``: run a searcher's ask/tell loop on a function until a budget or target."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._validate import check_int
from ..distributed import Comm, resolve_comm
from .base import Searcher, TensorLike
from .cem import CEM
from .cmaes import CMAES
from .openai_es import OpenAIES
from .pgpe import PGPE
from .sep_cmaes import SepCMAES
from .snes import SNES

__all__ = ["METHODS", "SearchResult", "minimize"]

METHODS: dict[str, type[Searcher]] = {
    "cmaes": CMAES, "sep_cmaes": SepCMAES, "cem": CEM, "snes": SNES, "pgpe": PGPE, "openai_es": OpenAIES,
}


@dataclass
class SearchResult:
    """What :func:`minimize` found.

    ``x``/``fun``: best candidate and its value; ``nfev``: evaluations used; ``nit``: generations;
    ``history``: ``(nfev, best f so far)`` after every generation; ``stop``: why the run ended;
    ``searcher``: the searcher, to continue or inspect. After a failure, the exception's ``partial_result``.

    Args:
        x: the best candidate found.
        fun: its value (inf before any finite value).
        nfev: evaluations used.
        nit: generations told.
        history: ``(nfev, best f so far)`` after every generation.
        stop: why the run ended (``{"budget": ...}``, ``{"ftarget": ...}``, the searcher's stop reasons, or
            ``{"error": ...}`` on a partial result).
        searcher: the searcher itself.
    """

    x: torch.Tensor
    fun: float
    nfev: int
    nit: int
    history: list[tuple[int, float]] = field(default_factory=list)
    stop: dict[str, Any] = field(default_factory=dict)
    searcher: Searcher | None = None

    @property
    def success(self) -> bool:
        return "ftarget" in self.stop


def _evaluate(f: Callable, x: torch.Tensor, batched: bool) -> torch.Tensor:
    if batched:
        out = torch.as_tensor(f(x))
        if out.dim() == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.shape != (x.shape[0],):
            raise ValueError(f"f returned shape {tuple(out.shape)} for a batch of {x.shape[0]} candidates; with "
                             "batched=True f must map [pop, d] -> [pop] (pass batched=False for f(x[d]) -> scalar)")
        return out
    vals = []
    for row in x:
        v = torch.as_tensor(f(row))
        if v.numel() != 1:
            raise ValueError(f"f must return a scalar for one candidate (batched=False), got shape {tuple(v.shape)}")
        vals.append(v.reshape(()).to(x.dtype))
    return torch.stack(vals)


def minimize(f: Callable[[torch.Tensor], Any], x0: TensorLike, sigma0: TensorLike, method: str = "cmaes", *,
             budget: int | None = None, seed: int | None = None, batched: bool = True, ftarget: float | None = None,
             bounds=None, callback: Callable[[Searcher], Any] | None = None, distributed: bool | Comm = False,
             **options: Any) -> SearchResult:
    """Minimise ``f`` from ``x0`` with step size ``sigma0`` by ``method``.

    Args:
        f: with ``batched=True`` maps ``[pop, d] -> [pop]``; with ``batched=False`` one candidate ``[d]`` to a
            scalar.
        x0: the initial mean (``[d]``).
        sigma0: the initial step size (a scalar, or one per coordinate).
        method: ``"cmaes"``, ``"sep_cmaes"``, ``"cem"``, ``"snes"``, ``"pgpe"``, ``"openai_es"`` or a
            :class:`Searcher` subclass.
        budget: maximum number of evaluations (default ``1e4 · d``); a generation that would exceed it is
            not started.
        seed: the searcher's seed (None: nondeterministic; required with ``distributed``).
        batched: whether ``f`` evaluates a whole population at once (default True).
        ftarget: stop as soon as a value ``<= ftarget`` is found.
        bounds: box constraints passed to the searcher (see :class:`Searcher`); default None.
        callback: called with the searcher after every generation; returning True stops the run.
        distributed: ``True`` (or a :class:`gradkit.distributed.Comm`) when ``torch.distributed`` is
            initialised: every rank runs the same searcher (same ``seed``, required), evaluates its share of
            each generation's candidates, and the fitness values are all-gathered, so every rank tells the same
            values and ends with the same result. A rank whose ``f`` raises makes every rank raise.
        options: passed to the searcher (e.g. ``popsize``, ``restarts`` for CMA-ES's IPOP).

    Returns:
        A :class:`SearchResult`. If ``f`` (or ``callback``) raises, the exception propagates with the progress
        made until then attached as ``exc.partial_result`` (a :class:`SearchResult` whose ``stop`` holds
        ``{"error": ...}``; the generation that failed is not counted), so a late failure loses nothing::

            try:
                r = gk.search.minimize(f, x0, 0.5)
            except Exception as exc:
                r = exc.partial_result
    """
    if isinstance(method, str):
        if method.lower() not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)} or a Searcher class, got {method!r}")
        cls = METHODS[method.lower()]
    elif isinstance(method, type) and issubclass(method, Searcher):
        cls = method
    else:
        raise ValueError(f"method must be one of {tuple(METHODS)} or a Searcher class, got {method!r}")
    comm = None
    if distributed is not False and distributed is not None:
        if seed is None:
            raise ValueError("seed is required with distributed=True: every rank must run the same searcher")
        comm = resolve_comm(distributed if isinstance(distributed, Comm) else "auto", seed)
    es = cls(x0, sigma0, seed=seed, bounds=bounds, **options)
    budget = check_int("budget", int(1e4 * es.dim) if budget is None else budget, 1)
    history: list[tuple[int, float]] = []
    stop: dict[str, Any] = {}

    def result() -> SearchResult:
        x_best, f_best = es.best
        return SearchResult(x_best, f_best if math.isfinite(f_best) else math.inf, es.nfev, es.generation,
                            list(history), dict(stop), es)

    try:
        while True:
            if es.nfev + es.popsize > budget:
                stop = {"budget": budget}
                break
            x = es.ask()
            if comm is None:
                fx = _evaluate(f, x, batched)
            else:  # this rank's share of the candidates; every rank receives every fitness value
                mine = comm.split(len(x))
                fx = comm.gather_scalars(lambda: _evaluate(f, x[mine.start:mine.stop], batched), len(x)).to(x.dtype)
            es.tell(x, fx)
            history.append((es.nfev, es.best_f))
            if ftarget is not None and es.best_f <= ftarget:
                stop = {"ftarget": es.best_f}
                break
            if callback is not None and callback(es):
                stop = {"callback": True}
                break
            if es.stop():
                stop = es.stop_reasons()
                break
    except Exception as exc:
        # The progress so far survives a late failure of f (or of the callback): the exception carries it.
        stop = {"error": f"{type(exc).__name__}: {exc}"}
        exc.partial_result = result()  # type: ignore[attr-defined]
        raise
    return result()
