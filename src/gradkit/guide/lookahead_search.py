"""Look-ahead search — R candidate continuations per guided step, kept by the reward of a one-step look-ahead.

Papers: "Free²Guide: Gradient-Free Path Integral Control for Enhancing Text-to-Video Generation with Large
Vision-Language Models" (Kim et al., 2024) and "CoDe: Blockwise Control for Denoising Diffusion Models" (Singh et al.,
2025). At a decision step k each particle draws R stochastic continuations of the next B steps (B = 1: Free²Guide;
B > 1: CoDe's blocks), scores each candidate by the reward of its look-ahead data prediction
``x̂1 = x + (1−t)·v(x, t)`` at the block's end (one more network call; free for the kept candidate, whose velocity
the next step reuses), and keeps

    argmax_j r(x̂1_j)                 (Free²Guide's code, CoDe)         or
    j ~ softmax(r(x̂1_j)/λ)           (path-integral control weights ∝ exp(r/λ); CoDe(η))

Free²Guide guides the first steps only (6 of 50 in the authors' code, R = 10) and draws its first candidates as R
fresh initial noises. A greedy search is a biased optimiser of the reward, not a sampler of a tilted law: read its
result as reward against compute (``gradkit bench guide --part particles``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._validate import check_choice, check_int, check_range
from ..errors import NonFiniteError
from . import _convert as C
from ._population import PopulationOutput, _Population
from .base import Guidance, StepContext, index_cond

Tensor = torch.Tensor
f64 = torch.float64

__all__ = ["CoDe", "Free2Guide", "LookAheadSearch"]


class LookAheadSearch(_Population):
    """Per-step (or per-block) candidate search scored by a one-step look-ahead reward (step level).

    Args:
        reward: ``reward(x1) -> [B]``, any callable on a batch of samples (a black box is fine).
        n_candidates: R, candidate continuations per particle and decision (default 10, Free²Guide's).
        block: B, steps per decision (default 1; CoDe's blocks for B > 1: the sampler's grid must be uniform,
            or sample with :meth:`run`, which knows any grid).
        start: first decision step (default 0).
        stop: decisions happen before this step (default: every step).
        select: ``"argmax"`` (default) or ``"softmax"`` (a candidate drawn ∝ exp(r/λ)).
        temperature: λ of ``"softmax"`` (default 1.0).
        initial_noise: at step 0 the candidates other than the first are fresh initial noises (Free²Guide;
            default False).
        g: the diffusion ``g0·(1−t)`` (float) or ``g(t)`` of the candidates' SDE steps (default 1.0; :meth:`run`
            uses its own ``g``).
        base: the velocity (default :class:`~gradkit.guide.Conditional`); it is evaluated on batches of R·b
            candidates, so keep it stateless (CFG, not APG with momentum).
        seed: seed of the soft selection's draws (default 0).
        on_nonfinite: ``"raise"`` (default), ``"worst"`` (a non-finite candidate ranks last) or ``"ignore"``.
        comm: ``"auto"`` (default), ``None`` or a :class:`gradkit.distributed.Comm`: particles (and their
            candidates) split over ranks in :meth:`run`; noise and selection draws are made for the whole
            population on every rank, so the result equals one process.

    Cost per decision and particle: 1 + R·(B − 1) network evaluations for the candidates (the R copies share
    their first velocity) and R for the look-ahead (the kept one's is reused by the next step), so block search
    with B = 1 costs R extra evaluations per guided step; ``decisions`` records ``(step, chosen [b],
    rewards [b, R])``.
    """

    paper = "Free²Guide: Gradient-Free Path Integral Control for Enhancing Text-to-Video Generation with Large " \
            "Vision-Language Models"

    def __init__(self, reward: Callable[[Tensor], Any], n_candidates: int = 10, *, block: int = 1, start: int = 0,
                 stop: int | None = None, select: str = "argmax", temperature: float = 1.0,
                 initial_noise: bool = False, g: float | Callable[[float], float] = 1.0,
                 base: Guidance | None = None, seed: int = 0, on_nonfinite: str = "raise", comm: Any = "auto"):
        super().__init__(base=base, n_particles=None, proposal=None, seed=seed, on_nonfinite=on_nonfinite,
                         comm=comm)
        if not callable(reward):
            raise ValueError(f"reward must be callable, got {type(reward).__name__}")
        from .sampler import _g_fn

        self.reward = reward
        self.n_candidates = check_int("n_candidates", n_candidates, 1)
        self.block = check_int("block", block, 1)
        self.start = check_int("start", start, 0)
        self.stop = None if stop is None else check_int("stop", stop, 0)
        self.select = check_choice("select", select, ("argmax", "softmax"))
        self.temperature = check_range("temperature", temperature, 0.0, low_open=True)
        self.initial_noise = bool(initial_noise)
        self.g = _g_fn(g)
        self.decisions: list[tuple[int, Tensor, Tensor]] = []
        self._queue: list[tuple[float, Tensor]] = []

    def reset(self, x: Tensor, num_steps: int) -> None:
        super().reset(x, num_steps)
        self.decisions = []
        self._queue = []

    def is_decision(self, step: int, num_steps: int) -> bool:
        """Whether ``step`` (0-based) starts a search.

        Args:
            step: the step index.
            num_steps: the number of steps of the run.
        """
        stop = num_steps if self.stop is None else min(self.stop, num_steps)
        return self.start <= step < stop and (step - self.start) % self.block == 0

    def step(self, ctx: StepContext) -> Tensor | None:
        if self._queue:
            t_expected, x_next = self._queue.pop(0)
            if abs(ctx.t - t_expected) > 1e-9:
                raise RuntimeError("the sampler's time grid is not uniform: blocks (block > 1) outside .run(...) "
                                   "assume one; sample with .run(..., times=...) instead")
            return x_next
        if self.is_decision(ctx.step, ctx.num_steps):
            return self._search(ctx)
        return super().step(ctx)

    def _noise(self, ctx: StepContext, R: int, shape: tuple[int, ...], dtype, device) -> Tensor:
        full = torch.randn((self.total * R, *shape), generator=ctx.generator, dtype=dtype, device=device)
        if len(self.rows) == self.total:
            return full
        return full[self.rows.start * R:self.rows.stop * R]

    def _search(self, ctx: StepContext) -> Tensor:
        x, s, R = ctx.x, ctx.step, self.n_candidates
        b = x.shape[0]
        nb = min(self.block, ctx.num_steps - s)
        if nb == 1:
            grid = [ctx.t, ctx.t_next]
        elif self._times is not None:
            grid = [float(t) for t in self._times[s:s + nb + 1]]
        else:  # outside run(): assume the sampler's grid is uniform; every queued step checks it
            grid = _uniform_grid(ctx, nb)
        rep = torch.arange(b, device=x.device).repeat_interleave(R)
        xs = x[rep]
        shared = not (self.initial_noise and s == 0 and R > 1)
        if not shared:
            fresh = self._noise(ctx, R, tuple(x.shape[1:]), x.dtype, x.device)
            first = (torch.arange(b * R, device=x.device) % R == 0).reshape(-1, *([1] * (x.ndim - 1)))
            xs = torch.where(first, xs, fresh)
        cond = index_cond(ctx.cond, rep)
        gfun = self._g if self._g is not None else self.g
        states = []
        for j in range(nb):
            t0, t1 = grid[j], grid[j + 1]
            h = t1 - t0
            c = StepContext(x=xs, t=t0, t_next=t1, t_step=t0, step=s + j, num_steps=ctx.num_steps, stage=0,
                            cond=cond, model=ctx.model, counter=ctx.counter, generator=ctx.generator, method="sde")
            # the R copies of a particle share their first velocity: one evaluation per particle, not R
            v = self.velocity(ctx)[rep] if (j == 0 and shared) else self.base.velocity(c)
            g = float(gfun(t0))
            drift = v + 0.5 * g * g * C.score_from_v(xs, v, t0) if g != 0.0 else v
            xs = xs + h * drift + (g * abs(h) ** 0.5) * self._noise(ctx, R, tuple(x.shape[1:]), x.dtype, x.device)
            states.append(xs)
        t_end = grid[-1]
        v_end = None
        if t_end >= 1.0:
            x1 = xs
        else:
            c = StepContext(x=xs, t=t_end, t_next=t_end, t_step=t_end, step=s + nb, num_steps=ctx.num_steps,
                            stage=0, cond=cond, model=ctx.model, counter=ctx.counter, generator=ctx.generator,
                            method="sde")
            v_end = self.base.velocity(c)
            x1 = C.x1_from_v(xs, v_end, t_end)
        r = self._candidate_rewards(x1).reshape(b, R)
        u = torch.rand(self.total, dtype=f64, generator=self.generator)[self.rows.start:self.rows.stop]
        if self.select == "argmax":
            pick = torch.argmax(r, dim=1)
        else:
            w = torch.softmax(r / self.temperature, dim=1)
            cdf = torch.cumsum(w, dim=1)
            cdf = cdf / cdf[:, -1:]
            pick = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp_(max=R - 1)
        rows = torch.arange(b) * R + pick
        self.decisions.append((s, pick.clone(), r.clone()))
        self._queue = [(grid[j + 1], st[rows]) for j, st in enumerate(states[1:])]
        out = states[0][rows]
        if v_end is not None:
            last = self._queue[-1][1] if self._queue else out
            self._remember_velocity(s + nb, last, v_end[rows])
        return out

    def _candidate_rewards(self, x1: Tensor) -> Tensor:
        r = self.reward(x1)
        r = torch.as_tensor(r).detach().to(f64).reshape(-1).cpu()
        if r.numel() != x1.shape[0]:
            raise ValueError(f"the reward must return one value per sample ([{x1.shape[0]}]), got {r.numel()}")
        if self.on_nonfinite == "ignore":
            return r
        bad = ~torch.isfinite(r)
        if bool(bad.any()):
            if self.on_nonfinite == "raise":
                raise NonFiniteError(f"non-finite reward for {int(bad.sum())} candidate(s); nothing was updated "
                                     "(on_nonfinite='worst' ranks them last)")
            r = torch.where(bad, torch.full_like(r, -math.inf), r)
            if bool(torch.isneginf(r.reshape(-1, self.n_candidates)).all(1).any()):
                raise NonFiniteError("every candidate of a particle has a non-finite reward")
        return r

    def _output(self, x: Tensor, nfe: float) -> PopulationOutput:
        return PopulationOutput(x=x, log_weights=torch.zeros(self.total, dtype=f64),
                                rewards=torch.full((self.total,), math.nan, dtype=f64), nfe=nfe, rows=self.rows,
                                info={"decisions": list(self.decisions)})

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "decisions": [(s, p.clone(), r.clone()) for s, p, r in self.decisions],
                "queue": [(t, q) for t, q in self._queue]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_base_state(state)
        self.decisions = [(int(s), p.clone(), r.clone()) for s, p, r in state["decisions"]]
        self._queue = [(float(t), q) for t, q in state["queue"]]


def _uniform_grid(ctx: StepContext, nb: int) -> list[float]:
    """The times ``t_s … t_{s+nb}`` of a uniform grid through the current step, rebuilt the way the sampler builds
    one (``time_grid``) so the values agree to the last bit when the grid is the sampler's default."""
    from .sampler import time_grid

    t0 = round(ctx.t - ctx.step * ctx.h, 12)
    t1 = round(t0 + ctx.num_steps * ctx.h, 12)
    grid = time_grid(ctx.num_steps, t0, t1)
    s = ctx.step
    if abs(float(grid[s]) - ctx.t) < 1e-12 and abs(float(grid[s + 1]) - ctx.t_next) < 1e-12:
        return [float(t) for t in grid[s:s + nb + 1]]
    return [ctx.t + j * ctx.h for j in range(nb)] + [min(ctx.t + nb * ctx.h, 1.0)]


class Free2Guide(LookAheadSearch):
    """Free²Guide's presets: R = 10 candidates for the first 6 steps, argmax, fresh initial noises at step 0.

    Args:
        reward: ``reward(x1) -> [B]`` (in the paper a black-box vision-language model score).
        n_candidates: R (default 10).
        guided_steps: number of leading steps that search (default 6, the authors' 6 of 50).
        **kw: further :class:`LookAheadSearch` arguments (``select="softmax"`` for the path-integral weights).
    """

    paper = LookAheadSearch.paper

    def __init__(self, reward: Callable[[Tensor], Any], n_candidates: int = 10, *, guided_steps: int = 6,
                 **kw: Any):
        kw.setdefault("initial_noise", True)
        super().__init__(reward, n_candidates, stop=check_int("guided_steps", guided_steps, 0), **kw)


class CoDe(LookAheadSearch):
    """CoDe's blockwise control: every B steps, N continuations of the block, the best (or one ∝ exp(r/λ)) kept.

    Args:
        reward: ``reward(x1) -> [B]``.
        n_candidates: N, continuations per block (default 4).
        block: B, steps per block (default 5).
        **kw: further :class:`LookAheadSearch` arguments (``select="softmax"``, ``temperature`` for CoDe(η)).
    """

    paper = "CoDe: Blockwise Control for Denoising Diffusion Models"

    def __init__(self, reward: Callable[[Tensor], Any], n_candidates: int = 4, *, block: int = 5, **kw: Any):
        super().__init__(reward, n_candidates, block=block, **kw)
