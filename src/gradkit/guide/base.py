"""What a guidance method sees and implements: the step context and the three levels of guidance.

* **rule** — a function of the per-step predictions: :meth:`Guidance.velocity` returns the guided velocity at the
  context's point (CFG, CFG-Zero*, APG, GFCG, classifier guidance, schedules). Any solver uses it.
* **step** — needs the sampler step itself: :meth:`Guidance.step` returns the next state (CFG++, TFG's
  recurrence, FlowChef's inner loop). Such methods name the solver ``methods`` they support.
* **population** — acts on the whole batch of particles after each step: :meth:`Guidance.after_step` may
  reweight / resample ``x`` (best-of-N, FK steering, …; part 2 builds these on this hook).

Each piece keeps its state (momentum buffers, switches, log-weights, source step counts) in ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from .._stateful import Stateful
from . import _convert as C
from .model import FlowModel, as_flow_model

Tensor = torch.Tensor

__all__ = ["SAME", "Composite", "Conditional", "Guidance", "StepContext", "Unconditional", "index_cond"]


class _Same:
    """Sentinel: "the condition the sampler was called with"."""

    def __repr__(self) -> str:
        return "SAME"

    def __reduce__(self):
        return "SAME"


SAME = _Same()


def index_cond(cond: Any, rows: Tensor) -> Any:
    """The rows ``rows`` of a batched condition: ``None``/scalars pass through, tensors with a leading batch
    dimension are indexed, dicts / lists / tuples recursively."""
    if cond is None or isinstance(cond, (int, float, str)):
        return cond
    if isinstance(cond, Tensor):
        return cond if cond.ndim == 0 else cond[rows]
    if isinstance(cond, dict):
        return {k: index_cond(v, rows) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(index_cond(c, rows) for c in cond)
    raise ValueError(f"cannot select rows of a condition of type {type(cond).__name__}")


class _Counter:
    """Network evaluations, counted in rows (one row = one sample through the network once)."""

    def __init__(self, batch: int):
        self.batch = batch
        self.rows = 0
        self.calls = 0

    @property
    def nfe(self) -> float:
        """Network evaluations per sample (a cond + uncond pair counts 2)."""
        return self.rows / max(self.batch, 1)


class StepContext:
    """One evaluation point of the sampler, handed to :meth:`Guidance.velocity` / :meth:`Guidance.step`.

    Args:
        x: the state at this evaluation point (``[B, ...]``).
        t: its time (float, 0 = noise, 1 = data).
        t_next: the end of the current step (``t`` of the next grid point).
        t_step: the start of the current step (= ``t`` at stage 0).
        step: the index of the current step (0-based).
        num_steps: the number of steps of the run.
        stage: which evaluation of the step this is (0 for the first; Heun/midpoint/RK4 have more).
        cond: the condition passed to the sampler.
        model: the sampler's :class:`~gradkit.guide.FlowModel`.
        generator: the sampler's ``torch.Generator`` (for stochastic methods).
        method: the solver method name.
        counter: the sampler's NFE counter (shared by every context of a run).

    All arguments are keyword-only and stored as attributes of the same names.
    """

    def __init__(self, *, x: Tensor, t: float, t_next: float, t_step: float, step: int, num_steps: int, stage: int,
                 cond: Any, model: FlowModel, counter: _Counter, generator: torch.Generator | None, method: str):
        self.x = x
        self.t = float(t)
        self.t_next = float(t_next)
        self.t_step = float(t_step)
        self.step = step
        self.num_steps = num_steps
        self.stage = stage
        self.cond = cond
        self.model = model
        self.counter = counter
        self.generator = generator
        self.method = method
        self._cache: dict[Any, tuple] = {}

    @property
    def h(self) -> float:
        """The step size ``t_next − t_step``."""
        return self.t_next - self.t_step

    def times(self, n: int | None = None, t: float | None = None) -> Tensor:
        """A ``[n]`` tensor of the time ``t`` (default: this point's) in ``x``'s dtype and device."""
        n = self.x.shape[0] if n is None else n
        return torch.full((n,), self.t if t is None else float(t), dtype=self.x.dtype, device=self.x.device)

    def velocity(self, cond: Any = SAME, *, x: Tensor | None = None, t: float | None = None,
                 model: Any = None, rows: Tensor | None = None) -> Tensor:
        """The model's velocity at this point (or at ``x`` / ``t`` / for ``rows`` only), counting NFE.

        ``cond`` defaults to the sampler's condition; ``cond=None`` is the unconditional prediction. ``model``
        evaluates another network (e.g. Autoguidance's weaker model) with its own declared prediction. Results at
        this context's own point are cached, so two rules asking for the same prediction cost one evaluation.
        """
        c = self.cond if cond is SAME else cond
        own = x is None and t is None and rows is None
        m = self.model if model is None else as_flow_model(model)
        key = (id(c), id(m))
        if own and key in self._cache:
            return self._cache[key][2]
        xx = self.x if x is None else x
        if rows is not None:
            xx = xx[rows]
            c = index_cond(c, rows)
        n = xx.shape[0]
        v = m(xx, self.times(n, t), c)
        self.counter.rows += n
        self.counter.calls += 1
        if own:
            self._cache[key] = (c, m, v)  # holding c and m keeps their ids from being reused while cached
        return v

    def at(self, x: Tensor, t: float | None = None) -> StepContext:
        """A context for another point ``(x, t)`` of the same step (own cache, shared NFE counter)."""
        return StepContext(x=x, t=self.t if t is None else t, t_next=self.t_next, t_step=self.t_step, step=self.step,
                           num_steps=self.num_steps, stage=self.stage, cond=self.cond, model=self.model,
                           counter=self.counter, generator=self.generator, method=self.method)

    def x1(self, v: Tensor, x: Tensor | None = None, t: float | None = None) -> Tensor:
        """Data prediction ``x̂1 = x + (1−t)·v``."""
        return C.x1_from_v(self.x if x is None else x, v, self.t if t is None else t)

    def x0(self, v: Tensor, x: Tensor | None = None, t: float | None = None) -> Tensor:
        """Noise prediction ``x̂0 = x − t·v``."""
        return C.x0_from_v(self.x if x is None else x, v, self.t if t is None else t)

    def score(self, v: Tensor, x: Tensor | None = None, t: float | None = None) -> Tensor:
        """Score ``(t·v − x)/(1−t)`` (singular at t = 1)."""
        return C.score_from_v(self.x if x is None else x, v, self.t if t is None else t)


class Guidance(Stateful):
    """Base of every guidance method. Subclasses override one level:

    * :meth:`velocity` (rule level) — the guided velocity at ``ctx``; default: the conditional velocity;
    * :meth:`step` (step level) — the next state, or ``None`` to let the solver step with :meth:`velocity`;
    * :meth:`after_step` (population level) — reweight / resample the batch after each step.

    :meth:`reset` is called when sampling starts (batch known); :meth:`reindex` reorders per-sample state when a
    population method resamples the batch. ``state_dict`` / ``load_state_dict`` carry what a
    resumed run needs, bit for bit. ``paper`` names the paper (``gradkit list`` shows it).
    """

    paper: ClassVar[str] = ""
    #: the solver methods a step-level method supports (None: all)
    methods: ClassVar[tuple[str, ...] | None] = None

    def reset(self, x: Tensor, num_steps: int) -> None:
        """Called once when sampling starts, with the initial state and the number of steps."""

    def velocity(self, ctx: StepContext) -> Tensor:
        return ctx.velocity()

    def step(self, ctx: StepContext) -> Tensor | None:
        return None

    def after_step(self, ctx: StepContext, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Population hook, called after every step with the new state (``ctx`` is at the step's end, stage −1).
        Return the (possibly reweighted / resampled) state, or ``(x, index)`` when rows were resampled — row i of
        the new batch descends from row ``index[i]`` — so the sampler reorders a per-row condition as well (the
        method reorders its own per-sample state and its base rule's with :meth:`reindex`)."""
        return x

    def reindex(self, index: Tensor) -> None:
        """Reorder the per-sample state after a population method resampled the batch: row ``i`` of the new batch
        is row ``index[i]`` of the old one (default: no per-sample state)."""


class Composite(Guidance):
    """A guidance built on other parts (base rules, gradient estimators): ``reset`` and ``reindex`` reach every part
    that is a :class:`Guidance`, ``state_dict`` holds every part's state under its key, ``skipped`` adds up the
    parts' skip counts. Subclasses name their parts in ``parts = {state key: attribute}``.
    """

    parts: ClassVar[dict[str, str]] = {"base": "base"}

    def _parts(self) -> list[tuple[str, Any]]:
        return [(key, getattr(self, attr)) for key, attr in self.parts.items()]

    @property
    def skipped(self) -> int:
        """Rows or steps skipped by the parts' non-finite policy."""
        return sum(getattr(part, "skipped", 0) for _, part in self._parts())

    def reset(self, x: Tensor, num_steps: int) -> None:
        for _, part in self._parts():
            if isinstance(part, Guidance):
                part.reset(x, num_steps)

    def reindex(self, index: Tensor) -> None:
        for _, part in self._parts():
            if isinstance(part, Guidance):
                part.reindex(index)

    def state_dict(self) -> dict[str, Any]:
        return {key: part.state_dict() for key, part in self._parts()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, part in self._parts():
            part.load_state_dict(state[key])


class Conditional(Guidance):
    """No guidance: the velocity for the sampler's condition (or a fixed one).

    Args:
        cond: the condition to use (default: the sampler's).
    """

    def __init__(self, cond: Any = SAME):
        self.cond = cond

    def velocity(self, ctx: StepContext) -> Tensor:
        return ctx.velocity(self.cond)


class Unconditional(Conditional):
    """The unconditional velocity (``cond=None`` unless another "empty" condition is given).

    Args:
        uncond: what the model receives as "no condition" (default ``None``).
    """

    def __init__(self, uncond: Any = None):
        super().__init__(uncond)


def as_rule(rule: Guidance | Callable | None, default: Guidance) -> Guidance:
    if rule is None:
        return default
    if not isinstance(rule, Guidance):
        raise ValueError(f"base must be a gradkit.guide.Guidance, got {type(rule).__name__}")
    return rule
