"""Best-of-N — draw N samples, keep the best by a reward (hard), or one drawn ∝ exp(λ·r) (soft).

The standard inference-time-scaling baseline (used as such in "A General Framework for Inference-time Scaling and
Steering of Diffusion Models", Singhal et al., 2025, and in CoDe). For each group of N candidates x_1 … x_N:

    hard   x* = x_{argmax_i r(x_i)}                      selected reward has CDF F_R(r)^N
    soft   x* = x_I,  P(I = i) ∝ exp(λ·r(x_i))          sampling-importance-resampling: x* → p(x)·exp(λ·r(x))/Z
                                                          as N → ∞ (bias O(1/N))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._validate import check_choice, check_int, check_range
from ._population import PopulationOutput, _Population
from .base import Guidance, StepContext

Tensor = torch.Tensor
f64 = torch.float64

__all__ = ["BestOfN"]


class BestOfN(_Population):
    """Best-of-N selection after sampling (population level; every sampler and method works).

    Args:
        reward: ``reward(x1) -> [B]``, any callable on a batch of samples (a black box is fine).
        n: N, candidates per group; the batch holds ``B = G·N`` rows, G groups of contiguous rows (default: the
            whole batch is one group).
        mode: ``"hard"`` (default, argmax) or ``"soft"`` (one candidate drawn ∝ exp(λ·r)).
        lam: λ of the soft mode (default 1.0).
        base: the velocity the candidates follow (default :class:`~gradkit.guide.Conditional`).
        proposal: a transition ``(x, t, t_next, cond, generator) -> x_next`` replacing the sampler's step
            (e.g. an exact ancestral kernel in tests; default: the sampler's step).
        seed: seed of the soft mode's draws (default 0).
        on_nonfinite: ``"raise"`` (default), ``"worst"`` (a non-finite reward ranks last) or ``"ignore"``.
        comm: ``"auto"`` (default: candidates split over ranks in :meth:`run` when torch.distributed is
            initialised; the rewards are all-gathered, every rank selects the same candidates and receives them),
            ``None`` or a :class:`gradkit.distributed.Comm`.

    After sampling: ``chosen`` ``[G]`` global row indices, ``rewards`` ``[B]``; :meth:`select` picks the chosen
    rows of the sampler's output; :meth:`run` returns them (``x`` of shape ``[G, ...]``).
    """

    paper = "A General Framework for Inference-time Scaling and Steering of Diffusion Models"

    def __init__(self, reward: Callable[[Tensor], Any], n: int | None = None, *, mode: str = "hard",
                 lam: float = 1.0, base: Guidance | None = None, proposal: Callable | None = None, seed: int = 0,
                 on_nonfinite: str = "raise", comm: Any = "auto"):
        super().__init__(base=base, n_particles=None if n is None else check_int("n", n, 1), proposal=proposal,
                         seed=seed, on_nonfinite=on_nonfinite, comm=comm)
        if not callable(reward):
            raise ValueError(f"reward must be callable, got {type(reward).__name__}")
        self.reward = reward
        self.mode = check_choice("mode", mode, ("hard", "soft"))
        self.lam = check_range("lam", lam, 0.0)
        self.chosen = torch.zeros(0, dtype=torch.long)
        self.rewards = torch.zeros(0, dtype=f64)

    def reset(self, x: Tensor, num_steps: int) -> None:
        super().reset(x, num_steps)
        self.chosen = torch.zeros(0, dtype=torch.long)
        self.rewards = torch.full((self.total,), math.nan, dtype=f64)

    def choose(self, rewards: Tensor) -> Tensor:
        """``[G]`` global indices of the selected rows for ``[B]`` rewards (uses the soft mode's generator).

        Args:
            rewards: ``[B]`` rewards of every row (NaN/Inf follow ``on_nonfinite``).
        """
        r = torch.as_tensor(rewards, dtype=f64).reshape(-1)
        bad = self._bad_rows(r)
        rg = self._group_view(torch.where(bad, torch.full_like(r, -math.inf), r))
        N = self.group_size
        if self.mode == "hard":
            local = torch.argmax(rg, dim=1)
        else:
            logits = self.lam * rg
            if self.lam == 0.0:
                logits = torch.where(torch.isneginf(rg), rg, torch.zeros_like(rg))
            w = torch.softmax(logits, dim=1)
            local = torch.multinomial(w, 1, generator=self.generator).squeeze(1)
        return local + torch.arange(self.num_groups) * N

    def after_step(self, ctx: StepContext, x: Tensor) -> Tensor:
        if ctx.step != ctx.num_steps - 1:
            return x
        x1 = x if ctx.t >= 1.0 else ctx.x1(self.base.velocity(ctx))
        r = self._rewards(self.reward, x1)
        self.chosen = self.choose(r)
        self.rewards = r
        return x

    def select(self, x: Tensor) -> Tensor:
        """The chosen rows ``[G, ...]`` of a (one-process) sampler output ``x`` ``[B, ...]``.

        Args:
            x: the sampler's final states.
        """
        if x.shape[0] != self.total:
            raise ValueError(f"x must hold the {self.total} rows that were sampled, got {x.shape[0]}")
        return x[self.chosen]

    def _output(self, x: Tensor, nfe: float) -> PopulationOutput:
        chosen = self.chosen
        (best,) = self._take([x], lambda q: chosen)
        return PopulationOutput(x=best, log_weights=torch.zeros(self.total, dtype=f64), rewards=self.rewards.clone(),
                                nfe=nfe, rows=chosen.clone(), info={"chosen": chosen.clone(),
                                                               "best_reward": self.rewards[chosen].clone()})

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "chosen": self.chosen.clone(), "rewards": self.rewards.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_base_state(state)
        self.chosen = state["chosen"].clone()
        self.rewards = state["rewards"].clone()
