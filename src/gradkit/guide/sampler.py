"""The sampler: integrate the (guided) velocity along the linear path from noise (t = 0) to data (t = 1).

ODE steps (h = t_{i+1} − t_i, v = the guided velocity):

    euler      x + h·v(x, t)
    midpoint   x + h·v(x + h/2·v(x, t), t + h/2)
    heun       x + h/2·(k1 + k2),  k1 = v(x, t),  k2 = v(x + h·k1, t + h)
    rk4        classic fourth order

and an SDE step with the *same marginals* p_t (Euler–Maruyama; the score comes from the velocity, ``s =
(t·v − x)/(1−t)``):

    sde        x + h·[v + ½·g(t)²·s] + g(t)·√h·ξ,   ξ ~ N(0, I),   default g(t) = g0·(1 − t)

(``dx = [v + ½g²s]dt + g dW`` has the Fokker–Planck equation of the probability-flow ODE ``dx = v dt``, so it keeps
every marginal; renoising the posterior mean, as diffusers' ``stochastic_sampling`` does, does not.)

Guidance plugs in through :class:`~gradkit.guide.Guidance` (rule / step / population levels). Sampling runs under
``torch.no_grad`` unless ``grad=True`` (to differentiate through the solve); gradient-based guidance enables
autograd only inside its own gradient computation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._validate import check_choice, check_int, check_nonfinite, check_nonneg
from ..errors import NonFiniteError
from . import _convert as C
from .base import Conditional, Guidance, StepContext, _Counter, index_cond
from .model import as_flow_model

Tensor = torch.Tensor

__all__ = ["METHODS", "SampleOutput", "Sampler", "context", "flow_map", "guided_velocity", "sample", "time_grid"]

METHODS = ("euler", "midpoint", "heun", "rk4", "sde")
_STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "sde": 1}


def time_grid(steps: int, t_start: float = 0.0, t_end: float = 1.0, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """``steps + 1`` equally spaced times from ``t_start`` to ``t_end`` (either direction).

    Args:
        steps: number of steps N (≥ 1).
        t_start: first time (default 0.0, noise).
        t_end: last time (default 1.0, data; smaller than ``t_start`` for a backward grid).
        dtype: dtype of the grid (default float64).
    """
    check_int("steps", steps, 1)
    return torch.linspace(float(t_start), float(t_end), steps + 1, dtype=dtype)


@dataclass
class SampleOutput:
    """What :func:`sample` returns with ``full_output=True``.

    Args:
        x: the final state (``[B, ...]``).
        nfe: network evaluations per sample (a cond + uncond pair counts 2).
        times: the time grid (``[N + 1]``, float64).
        trajectory: ``[N + 1, B, ...]`` states at every grid time when requested, else ``None``.
        calls: number of network calls (batched).
        info: method-specific extras (empty by default).
    """

    x: Tensor
    nfe: float
    times: Tensor
    trajectory: Tensor | None = None
    calls: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class _LinearG:
    """``g(t) = g0·(1 − t)`` (picklable)."""

    def __init__(self, g0: float):
        self.g0 = g0

    def __call__(self, t: float) -> float:
        return self.g0 * (1.0 - t)


def _g_fn(g: float | Callable[[float], float]) -> Callable[[float], float]:
    if callable(g):
        return g
    return _LinearG(check_nonneg("g", g))


class Sampler:
    """A stepwise, resumable sampler (the engine behind :func:`sample`).

    Args:
        model: ``(x, t, cond) -> prediction`` with a declared parameterisation (see :class:`FlowModel`);
            plain callables are velocity models.
        guidance: a :class:`Guidance` (default: none, the conditional velocity).
        steps: number of steps N (default 50); ignored when ``times`` is given.
        method: ``"euler"`` (default), ``"midpoint"``, ``"heun"``, ``"rk4"`` or ``"sde"`` (Euler–Maruyama with
            the marginal-preserving drift ``v + ½g²s``).
        times: explicit monotone time grid (``[N + 1]``), e.g. ``1 − scheduler.sigmas`` of a diffusers scheduler;
            a decreasing grid integrates backwards (the inverse flow map Φ⁻¹; ODE methods only).
        t_start, t_end: ends of the uniform grid when ``times`` is not given (default 0 → 1).
        g: the SDE's diffusion ``g(t)``: a float g0 for ``g0·(1−t)`` (default 1.0) or a callable of t.
        seed: seed of the sampler's ``torch.Generator`` (SDE noise and stochastic guidance; default 0).
        grad: keep autograd on for the whole solve, to differentiate through it (default False: no_grad).
        trajectory: record the state at every grid time (default False).
        progress: show a progress bar (default: when the run has ≥ 200 steps and stderr is a terminal).
        on_nonfinite: ``"raise"`` (default) raises :class:`gradkit.NonFiniteError` naming the step when the state
            becomes NaN/Inf; ``"ignore"`` does not check (no cost). A sampler cannot honour "skip"/"worst".
    """

    def __init__(self, model: Any, *, guidance: Guidance | None = None, steps: int = 50, method: str = "euler",
                 times: Sequence[float] | Tensor | None = None, t_start: float = 0.0, t_end: float = 1.0,
                 g: float | Callable[[float], float] = 1.0, seed: int = 0, grad: bool = False,
                 trajectory: bool = False, progress: bool | None = None, on_nonfinite: str = "raise"):
        self.model = as_flow_model(model)
        if guidance is not None and not isinstance(guidance, Guidance):
            raise ValueError(f"guidance must be a gradkit.guide.Guidance, got {type(guidance).__name__}")
        self.guidance = guidance if guidance is not None else Conditional()
        self.method = check_choice("method", method, METHODS)
        if self.guidance.methods is not None and self.method not in self.guidance.methods:
            raise ValueError(f"method={method!r} is not supported by {type(self.guidance).__name__}; "
                             f"it supports {self.guidance.methods}")
        if times is None:
            self.times = time_grid(steps, t_start, t_end)
        else:
            tt = torch.as_tensor(times, dtype=torch.float64).flatten()
            if tt.numel() < 2:
                raise ValueError("times must hold at least two grid points")
            d = tt[1:] - tt[:-1]
            if not (bool((d > 0).all()) or bool((d < 0).all())):
                raise ValueError("times must be strictly monotone")
            if bool((tt < 0).any()) or bool((tt > 1).any()):
                raise ValueError("times must lie in [0, 1]")
            self.times = tt
        if self.method == "sde" and float(self.times[-1]) < float(self.times[0]):
            raise ValueError("method='sde' integrates forward in time only (times must increase)")
        self.g = _g_fn(g)
        self.seed = check_int("seed", seed, 0)
        self.grad = bool(grad)
        self.record = bool(trajectory)
        self.progress = progress
        self.on_nonfinite = check_nonfinite(on_nonfinite, ("raise", "ignore"), where="the sampler")
        self.x: Tensor | None = None
        self.cond: Any = None
        self.i = 0
        self.generator: torch.Generator | None = None
        self.counter = _Counter(0)
        self.traj: list[Tensor] = []

    @property
    def num_steps(self) -> int:
        return self.times.numel() - 1

    @property
    def done(self) -> bool:
        return self.x is not None and self.i >= self.num_steps

    @property
    def t(self) -> float:
        """The current time."""
        return float(self.times[self.i])

    def start(self, x: Tensor, cond: Any = None) -> None:
        """Begin at state ``x`` (time ``times[0]``) with condition ``cond``; resets the guidance's state."""
        if not isinstance(x, Tensor) or x.ndim < 1:
            raise ValueError("x must be a tensor [B, ...] of initial states")
        self.x = x if self.grad else x.detach()
        self.cond = cond
        self.i = 0
        self.generator = torch.Generator(device=x.device)
        self.generator.manual_seed(self.seed)
        self.counter = _Counter(x.shape[0])
        self.traj = [self.x] if self.record else []
        self.guidance.reset(self.x, self.num_steps)

    def _ctx(self, x: Tensor, t: float, stage: int) -> StepContext:
        return StepContext(x=x, t=t, t_next=float(self.times[self.i + 1]), t_step=float(self.times[self.i]),
                           step=self.i, num_steps=self.num_steps, stage=stage, cond=self.cond, model=self.model,
                           counter=self.counter, generator=self.generator, method=self.method)

    def _v(self, x: Tensor, t: float, stage: int) -> Tensor:
        return self.guidance.velocity(self._ctx(x, t, stage))

    def _solver_step(self, x: Tensor) -> Tensor:
        t0, t1 = float(self.times[self.i]), float(self.times[self.i + 1])
        h = t1 - t0
        m = self.method
        if m == "euler":
            return x + h * self._v(x, t0, 0)
        if m == "midpoint":
            k1 = self._v(x, t0, 0)
            return x + h * self._v(x + (h / 2) * k1, t0 + h / 2, 1)
        if m == "heun":
            k1 = self._v(x, t0, 0)
            k2 = self._v(x + h * k1, t1, 1)
            return x + (h / 2) * (k1 + k2)
        if m == "rk4":
            k1 = self._v(x, t0, 0)
            k2 = self._v(x + (h / 2) * k1, t0 + h / 2, 1)
            k3 = self._v(x + (h / 2) * k2, t0 + h / 2, 2)
            k4 = self._v(x + h * k3, t1, 3)
            return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        # sde: Euler–Maruyama with the marginal-preserving drift
        v = self._v(x, t0, 0)
        g = float(self.g(t0))
        drift = v + 0.5 * g * g * C.score_from_v(x, v, t0) if g != 0.0 else v
        noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype, device=x.device)
        return x + h * drift + (g * abs(h) ** 0.5) * noise

    def step(self) -> Tensor:
        """Advance one step; returns the new state."""
        if self.x is None:
            raise RuntimeError("call start(x, cond) before step()")
        if self.done:
            raise RuntimeError("the sampler has reached the end of its time grid")
        with torch.enable_grad() if self.grad else torch.no_grad():
            x = self.x
            ctx = self._ctx(x, float(self.times[self.i]), 0)
            x_next = self.guidance.step(ctx)
            if x_next is None:
                x_next = self._solver_step(x)
            ctx_after = self._ctx(x_next, float(self.times[self.i + 1]), -1)
            x_next = self.guidance.after_step(ctx_after, x_next)
            if isinstance(x_next, tuple):  # a population resampled its rows: (x, index), row i ← old row index[i]
                x_next, index = x_next
                self.cond = index_cond(self.cond, index)
        if not self.grad:
            x_next = x_next.detach()
        if self.on_nonfinite == "raise" and not bool(torch.isfinite(x_next).all()):
            raise NonFiniteError(f"the sampler state became non-finite at step {self.i} "
                                 f"(t = {float(self.times[self.i]):.6g} → {float(self.times[self.i + 1]):.6g})")
        self.x = x_next
        self.i += 1
        if self.record:
            self.traj.append(x_next)
        return x_next

    def run(self, x: Tensor | None = None, cond: Any = None) -> SampleOutput:
        """Run to the end of the grid (from ``x``, or from where a loaded state left off)."""
        if x is not None:
            self.start(x, cond)
        elif self.x is None:
            raise ValueError("x is required (initial states), unless a state was loaded")
        show = self.progress
        if show is None:
            show = self.num_steps >= 200 and sys.stderr.isatty()
        bar = _progress(self.num_steps - self.i) if show else None
        while not self.done:
            self.step()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        traj = torch.stack(self.traj) if self.record else None
        return SampleOutput(x=self.x, nfe=self.counter.nfe, times=self.times, trajectory=traj,
                            calls=self.counter.calls)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: state, step, condition, RNG, NFE counters, the guidance's state."""
        return {"x": self.x, "i": self.i, "cond": self.cond,
                "rng": None if self.generator is None else self.generator.get_state(),
                "rows": self.counter.rows, "calls": self.counter.calls, "batch": self.counter.batch,
                "trajectory": list(self.traj), "guidance": self.guidance.state_dict(), "times": self.times.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not torch.equal(state["times"], self.times):
            raise ValueError("the state was saved on a different time grid")
        self.x, self.i, self.cond = state["x"], int(state["i"]), state["cond"]
        if state["rng"] is not None:
            self.generator = torch.Generator(device=self.x.device)
            self.generator.set_state(state["rng"])
        self.counter = _Counter(int(state["batch"]))
        self.counter.rows, self.counter.calls = state["rows"], state["calls"]
        self.traj = list(state["trajectory"])
        self.guidance.load_state_dict(state["guidance"])


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, desc="gradkit.guide.sample", leave=False)


def sample(model: Any, x: Tensor, *, cond: Any = None, guidance: Guidance | None = None, steps: int = 50,
           method: str = "euler", times: Sequence[float] | Tensor | None = None, t_start: float = 0.0,
           t_end: float = 1.0, g: float | Callable[[float], float] = 1.0, seed: int = 0, grad: bool = False,
           trajectory: bool = False, progress: bool | None = None, on_nonfinite: str = "raise",
           full_output: bool = False) -> Tensor | SampleOutput:
    """Integrate ``model`` (optionally guided) from the states ``x`` at ``t_start`` (noise) to ``t_end`` (data).

    Args:
        model: ``(x, t, cond) -> prediction``; velocity unless declared otherwise (:class:`FlowModel`).
        x: initial states ``[B, ...]`` (usually ``torch.randn``; seed it yourself).
        cond: the condition passed to the model (``None`` = unconditional).
        guidance: a :class:`Guidance` rule / step / population method (default: none).
        steps, method, times, t_start, t_end, g, seed, grad, trajectory, progress, on_nonfinite: see
            :class:`Sampler`.
        full_output: return a :class:`SampleOutput` (state, NFE per sample, grid, trajectory) instead of the
            final state only.

    Example::

        x = gk.guide.sample(model, torch.randn(16, 2), cond=labels, guidance=gk.guide.CFG(3.0), steps=32)
    """
    s = Sampler(model, guidance=guidance, steps=steps, method=method, times=times, t_start=t_start, t_end=t_end,
                g=g, seed=seed, grad=grad, trajectory=trajectory, progress=progress, on_nonfinite=on_nonfinite)
    out = s.run(x, cond)
    return out if full_output else out.x


def context(model: Any, x: Tensor, t: float, cond: Any = None, *, t_next: float | None = None, step: int = 0,
            num_steps: int = 1, seed: int = 0, method: str = "euler") -> StepContext:
    """A :class:`StepContext` at ``(x, t)`` outside a sampling run (to evaluate a rule on its own, e.g. in tests or
    in another framework's loop).

    Args:
        model: the model (any declared parameterisation).
        x: the state ``[B, ...]``.
        t: its time.
        cond: the condition (default ``None``).
        t_next: the end of the step (default ``min(t + 1/num_steps, 1)``).
        step: the step index (default 0).
        num_steps: the number of steps (default 1).
        seed: seed of the context's generator (default 0).
        method: the solver name reported to the rule (default ``"euler"``).
    """
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    tn = min(t + 1.0 / num_steps, 1.0) if t_next is None else t_next
    return StepContext(x=x, t=t, t_next=tn, t_step=t, step=step, num_steps=num_steps, stage=0, cond=cond,
                       model=as_flow_model(model), counter=_Counter(x.shape[0]), generator=gen, method=method)


def guided_velocity(guidance: Guidance, model: Any, x: Tensor, t: float, cond: Any = None, **kw: Any) -> Tensor:
    """The guided velocity of a rule-level ``guidance`` at ``(x, t)`` (under ``torch.no_grad``).

    Args:
        guidance: a rule-level :class:`Guidance`.
        model: the model.
        x: the state ``[B, ...]``.
        t: its time.
        cond: the condition (default ``None``).
        **kw: further keywords of :func:`context` (``t_next``, ``step``, ``num_steps``, ``seed``, ``method``).
    """
    with torch.no_grad():
        return guidance.velocity(context(model, x, t, cond, **kw))


def flow_map(model: Any, x: Tensor, t0: float = 0.0, t1: float = 1.0, *, cond: Any = None,
             guidance: Guidance | None = None, steps: int = 50, method: str = "rk4", grad: bool = False) -> Tensor:
    """The (discretised) flow map Φ_{t0→t1}(x) of a model's ODE; ``t1 < t0`` integrates backwards (Φ⁻¹).

    With ``grad=True`` the solve stays on the autograd graph, so a loss of Φ(x0) back-propagates to x0 (D-Flow,
    noise optimisation); for a fixed-step solver Φ is the same function in both uses. For the exact Gaussian-mixture
    flow map see :meth:`gradkit.guide.toy.GMM.flow_map`.

    Args:
        model: the model (any declared parameterisation).
        x: states at ``t0`` (``[B, ...]``).
        t0: start time (default 0.0, noise).
        t1: end time (default 1.0, data).
        cond: the condition (default ``None``).
        guidance: optional rule-level guidance applied along the way (ODE methods; default none).
        steps: number of steps (default 50).
        method: ODE method (default ``"rk4"``).
        grad: keep the autograd graph (default False).
    """
    if method == "sde":
        raise ValueError("method='sde' is not a flow map: use an ODE method")
    return sample(model, x, cond=cond, guidance=guidance, steps=steps, method=method, t_start=t0, t_end=t1,
                  grad=grad)
