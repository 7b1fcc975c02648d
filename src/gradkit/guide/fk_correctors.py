"""FKC — Feynman–Kac correctors for classifier-free guidance: SMC weights that make CFG sample its tilted target.

Paper: "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product of Experts" (Skreta, Akhound-Sadegh
et al., 2025). CFG at scale β integrates the velocity of the tilted *marginals* ``p_t(x|c)^β·p_t(x)^{1−β}``, which
does not end at the tilted target ``q ∝ p(x|c)^β·p(x)^{1−β}``. Simulating the SDE of the guided velocity,

    dx = [v_β + ½g(t)²·s_β] dt + g(t) dW,   v_β = (1−β)·v_u + β·v_c,   s_β = (1−β)·s_u + β·s_c

and carrying log-weights (flow form on the path ``x_t = (1−t)·x0 + t·x1``; independent of g)

    d log w = β(β−1)·⟨v_c − v_u, s_c − s_u⟩ dt = β(β−1)·(t/(1−t))·‖v_c − v_u‖² dt

makes the weighted particles target q (in the limit N → ∞), with resampling when the ESS is low. For β > 1 the
weights favour particles where the conditional and unconditional predictions disagree. The weights have finite
variance only when q is not much wider than the CFG law (1-D Gaussians: ``σ*² < 2·Var_CFG``).

``reference=True`` follows the authors' EDM sampler (martaskrt/fkc-diffusion,
``applications/images/edm2/generate_images.py``): the per-step increments are centred, clamped to
``[−clip, clip]`` (1 for Euler, 2 for Heun there; a heuristic outside the theory), the population is resampled
after every step but the last with their systematic scheme (weights clipped to [1e-6, 1]) and the weights reset.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._validate import check_choice, check_range
from ._population import RESAMPLERS, PopulationOutput, _Population, effective_sample_size, resample
from ._util import flat_norm
from .base import StepContext

Tensor = torch.Tensor
f64 = torch.float64

__all__ = ["FKCorrector", "reference_systematic"]


def reference_systematic(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The FKC authors' systematic resampling of one population (their ``sample_cat_sys``): weights
    ``clip(softmax(logits), 1e-6, 1)`` (not renormalised), positions ``(u + j/N) mod 1``, each mapped to the first
    cumulative weight ≥ it (an index past the end becomes the last one).

    Args:
        logits: ``[N]`` log-weights.
        generator: generator of the uniform draw (default: torch's global one).
    """
    n = logits.shape[-1]
    u = torch.rand((1,), dtype=f64, generator=generator)
    u = (u + torch.arange(n, dtype=f64) / n) % 1.0
    w = torch.clip(torch.softmax(logits.to(f64), dim=-1), 1e-6, 1.0)
    bins = torch.cumsum(w, dim=-1)
    ids = np.digitize(u.numpy(), bins.numpy(), right=True)
    ids[ids == n] = n - 1
    return torch.as_tensor(ids, dtype=torch.long)


class FKCorrector(_Population):
    """CFG at scale β with Feynman–Kac corrector weights and resampling (population level).

    Args:
        scale: β, the guidance scale of the target ``p(x|c)^β·p(x)^{1−β}`` (required; β > 1 sharpens).
        uncond: what the model receives as the unconditional condition (default ``None``).
        n_particles: N, particles per group (default: the whole batch is one group).
        adaptive: resample only when ESS < ``ess_threshold``·N (default True); False: after every step.
        ess_threshold: the adaptive threshold as a fraction of N (default 0.5).
        resampling: ``"systematic"`` (default) or ``"multinomial"``.
        final_resample: resample after the last step, whatever the ESS, so the particles are equally weighted
            (default True; the weights before it stay in ``final_log_weights``).
        reference: the authors' EDM procedure (centred, clamped increments; resampling after every step but the
            last with their systematic scheme; weights reset; default False).
        clip: the clamp of the reference increments (default 1.0, their Euler sampler; 2.0 for Heun).
        proposal: a transition ``(x, t, t_next, cond, generator) -> x_next`` replacing the sampler's step; it must
            follow the guided SDE for the weights to be right (default: the sampler's step, use ``method="sde"``).
        seed: seed of the resampling generator (default 0).
        on_nonfinite: ``"raise"`` (default), ``"worst"`` (a non-finite increment gives weight 0) or ``"ignore"``.
        comm: ``"auto"`` (default), ``None`` or a :class:`gradkit.distributed.Comm` (see :class:`FKSteering`).

    The weight increment of a step is computed from the predictions at its start (Euler in the weights), so with
    multi-stage solvers the later stages only move the particles. After a run: ``log_weights``,
    ``final_log_weights``, ``ancestry``, ``ess_history``.
    """

    paper = "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product of Experts"

    def __init__(self, scale: float, *, uncond: Any = None, n_particles: int | None = None, adaptive: bool = True,
                 ess_threshold: float = 0.5, resampling: str = "systematic", final_resample: bool = True,
                 reference: bool = False, clip: float = 1.0, proposal: Callable | None = None, seed: int = 0,
                 on_nonfinite: str = "raise", comm: Any = "auto"):
        super().__init__(base=None, n_particles=n_particles, proposal=proposal, seed=seed,
                         on_nonfinite=on_nonfinite, comm=comm)
        self.scale = check_range("scale", scale)
        self.uncond = uncond
        self.adaptive = bool(adaptive)
        self.ess_threshold = check_range("ess_threshold", ess_threshold, 0.0, 1.0)
        self.resampling = check_choice("resampling", resampling, RESAMPLERS)
        self.final_resample = bool(final_resample)
        self.reference = bool(reference)
        self.clip = check_range("clip", clip, 0.0, low_open=True)
        self.log_weights = torch.zeros(0, dtype=f64)
        self.final_log_weights = torch.zeros(0, dtype=f64)
        self.ancestry: list[tuple[int, Tensor]] = []
        self.ess_history: list[tuple[int, Tensor]] = []
        self._inc: Tensor | None = None

    def reset(self, x: Tensor, num_steps: int) -> None:
        super().reset(x, num_steps)
        self.log_weights = torch.zeros(self.total, dtype=f64)
        self.final_log_weights = torch.zeros(self.total, dtype=f64)
        self.ancestry = []
        self.ess_history = []
        self._inc = None

    def velocity(self, ctx: StepContext) -> Tensor:
        b = self.scale
        v_c = ctx.velocity()
        v_u = ctx.velocity(self.uncond)
        d = v_c - v_u
        if ctx.stage == 0:
            t = ctx.t
            # β(β−1)·⟨Δv, Δs⟩·h with Δs = t·Δv/(1−t) on the linear path (0 at t = 0, where both laws are N(0, I))
            coef = b * (b - 1.0) * (t / (1.0 - t)) * ctx.h if t < 1.0 else 0.0
            self._inc = coef * flat_norm(d).flatten().to(f64) ** 2
        return v_u + b * d

    def after_step(self, ctx: StepContext, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        i = ctx.step
        last = i == ctx.num_steps - 1
        inc_local = self._inc
        self._inc = None
        if inc_local is None:
            raise RuntimeError("FKCorrector needs its velocity at the start of every step (use it as the guidance "
                               "of the sampler, or give a proposal that calls it)")
        inc = self._gather(lambda: inc_local)
        bad = self._bad_rows(inc, "log-weight increment")
        if bool(bad.any()):
            inc = torch.where(bad, torch.full_like(inc, -math.inf), inc)
        N = self.group_size
        if self.reference:
            return self._reference_update(i, last, x, inc)
        self.log_weights = self.log_weights + inc
        lw = self._group_view(self.log_weights)
        ess = effective_sample_size(lw)
        self.ess_history.append((i, ess))
        if last:
            self.final_log_weights = self.log_weights.clone()
            if not self.final_resample:
                return x
        if self.adaptive and not last:
            which = ess < self.ess_threshold * N
        else:
            which = torch.ones(self.num_groups, dtype=torch.bool)
        if not bool(which.any()):
            return x
        anc = resample(lw, self.resampling, generator=self.generator)
        return self._apply(i, x, anc, which, lw)

    def _apply(self, i: int, x: Tensor, anc_g: Tensor, which: Tensor, lw: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        N = self.group_size
        offs = (torch.arange(self.num_groups) * N)[:, None]
        keep = torch.arange(N)[None].expand(self.num_groups, N)
        anc = (torch.where(which[:, None], anc_g, keep) + offs).reshape(-1)
        self.log_weights = torch.where(which[:, None], torch.zeros_like(lw), lw).reshape(-1)
        self.ancestry.append((i, anc))
        (x,) = self._resample_local(anc, [x])
        return self._resampled(x, anc)

    def _reference_update(self, i: int, last: bool, x: Tensor, inc: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if last:  # the authors' loop skips the weights of the last step
            self.final_log_weights = self.log_weights.clone()
            return x
        d = self._group_view(inc)
        d = (d - d.mean(dim=1, keepdim=True)).clamp(-self.clip, self.clip)
        a = self._group_view(self.log_weights) + d
        self.ess_history.append((i, effective_sample_size(a)))
        anc = torch.stack([reference_systematic(a[gi], self.generator) for gi in range(self.num_groups)])
        which = torch.ones(self.num_groups, dtype=torch.bool)
        return self._apply(i, x, anc, which, a)

    def _output(self, x: Tensor, nfe: float) -> PopulationOutput:
        return PopulationOutput(x=x, log_weights=self.log_weights.clone(), rewards=torch.full_like(
            self.log_weights, math.nan), nfe=nfe, rows=self.rows, ancestry=list(self.ancestry),
            info={"ess": list(self.ess_history), "final_log_weights": self.final_log_weights.clone()})

    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "log_weights": self.log_weights.clone(),
                "final_log_weights": self.final_log_weights.clone(), "inc": self._inc,
                "ancestry": [(i, a.clone()) for i, a in self.ancestry],
                "ess_history": [(i, e.clone()) for i, e in self.ess_history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_base_state(state)
        self.log_weights = state["log_weights"].clone()
        self.final_log_weights = state["final_log_weights"].clone()
        self._inc = state["inc"]
        self.ancestry = [(int(i), a.clone()) for i, a in state["ancestry"]]
        self.ess_history = [(int(i), e.clone()) for i, e in state["ess_history"]]
