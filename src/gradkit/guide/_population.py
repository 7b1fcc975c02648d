"""Shared machinery of the population methods (private): particle groups, importance weights, resampling, ESS,
ancestry, the stochastic proposal, rewards under the non-finite policy, and the split of particles over ranks.

A population run holds ``B = G·N`` rows: G independent groups (one per prompt, or independent repeats of a
run) of N particles each, contiguous. Resampling happens within a group. Log-weights, rewards and the
potentials' running statistics are ``[B]`` float64 tensors kept identical on every rank; only the states of the
rows a rank owns live there.

Across ranks (``torch.distributed`` initialised and ``run(..., comm="auto")``): rank r owns the contiguous rows
``Comm.split(B)``. It evaluates the model and the reward on its rows only; the rewards are all-gathered through
:meth:`gradkit.distributed.Comm.gather_scalars`, so every rank computes the same weights, and every random draw
that decides something (resampling, selection) comes from a generator with a shared seed — every rank takes the
same decision. The SDE noise of a step is drawn for the whole population on every rank and sliced, so a rank's
rows see the noise they would see in one process. After a resampling, a slot whose ancestor lives on another rank
receives that ancestor's state: the only tensors that travel are the states (and cached velocities) of the
particles that change rank, and nothing travels when none does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._validate import check_choice, check_int, check_nonfinite
from ..errors import NonFiniteError
from . import _convert as C
from .base import Conditional, Guidance, StepContext, as_rule, index_cond

Tensor = torch.Tensor
f64 = torch.float64

__all__ = ["RESAMPLERS", "PopulationOutput", "effective_sample_size", "resample"]

RESAMPLERS = ("systematic", "multinomial")
#: the non-finite policies a population stage honours (``"skip"`` has no meaning for a weight: see the README)
POPULATION_POLICIES = ("raise", "worst", "ignore")


# --------------------------------------------------------------------------------------------- weights
def effective_sample_size(log_weights: Tensor) -> Tensor:
    """Kish's effective sample size ``1/Σ w̃²`` of (unnormalised) log-weights, per row of ``[..., N]``.

    Args:
        log_weights: ``[N]`` or ``[G, N]`` log-weights (``−inf`` = weight 0).

    Returns:
        ``[]`` or ``[G]``: N for equal weights, 1 when one particle holds all the weight.
    """
    lw = torch.as_tensor(log_weights, dtype=f64)
    lw = lw - torch.logsumexp(lw, dim=-1, keepdim=True)
    return torch.exp(-torch.logsumexp(2.0 * lw, dim=-1))


def _normalised(log_weights: Tensor) -> Tensor:
    lw = log_weights - torch.logsumexp(log_weights, dim=-1, keepdim=True)
    return lw.exp()


def resample(log_weights: Tensor, method: str = "systematic", *, generator: torch.Generator | None = None,
             n: int | None = None) -> Tensor:
    """Ancestor indices drawn from (unnormalised) log-weights, independently per row of ``[G, N]``.

    ``"systematic"``: one uniform ``u`` per row, positions ``(u + j)/n``, ``j = 0 … n−1``, each mapped through the
    cumulative weights (every particle gets ``⌊n·w̃⌋`` or ``⌈n·w̃⌉`` copies; the lowest-variance common scheme).
    ``"multinomial"``: n independent draws ∝ w̃. A particle of weight 0 is never chosen.

    Args:
        log_weights: ``[N]`` or ``[G, N]`` log-weights (``−inf`` = weight 0; at least one finite per row).
        method: ``"systematic"`` (default) or ``"multinomial"``.
        generator: the ``torch.Generator`` of the draws (default: torch's global one).
        n: number of draws per row (default N).

    Returns:
        ``[n]`` or ``[G, n]`` indices into the last dimension.
    """
    check_choice("method", method, RESAMPLERS)
    lw = torch.as_tensor(log_weights, dtype=f64)
    flat = lw.ndim == 1
    if flat:
        lw = lw[None]
    N = lw.shape[-1]
    n = N if n is None else check_int("n", n, 1)
    if bool((lw == math.inf).any()) or bool(torch.isnan(lw).any()):
        raise NonFiniteError("log-weights hold NaN or +inf: cannot resample")
    if bool(torch.isneginf(lw).all(dim=-1).any()):
        raise NonFiniteError("every log-weight of a group is -inf (all weights 0): cannot resample")
    w = _normalised(lw)
    if method == "multinomial":
        idx = torch.multinomial(w, n, replacement=True, generator=generator)
    else:
        u = torch.rand(lw.shape[0], 1, dtype=f64, generator=generator)
        pos = (u + torch.arange(n, dtype=f64)[None]) / n
        cdf = torch.cumsum(w, dim=-1)
        # divide by the last entry: it becomes exactly 1 (and so does every entry after the last positive
        # weight), so positions < 1 never land on a trailing zero-weight particle
        cdf = cdf / cdf[:, -1:]
        idx = torch.searchsorted(cdf, pos, right=True).clamp_(max=N - 1)
    return idx[0] if flat else idx


# --------------------------------------------------------------------------------------------- output
@dataclass
class PopulationOutput:
    """What a population method's ``run`` returns.

    Args:
        x: the final states: this rank's rows (all rows in one process, or with ``gather=True``).
        log_weights: ``[B]`` final log-weights (float64; equal within a group after a final resampling).
        rewards: ``[B]`` the last rewards evaluated (float64; NaN where none was evaluated).
        nfe: network evaluations per row (a cond + uncond pair counts 2).
        rows: the global indices of the rows in ``x`` (a range of this rank's rows, or the selected rows).
        ancestry: ``(step, ancestors [B])`` for every step that resampled (global indices).
        info: method-specific extras (ESS history, log-normaliser, chosen indices, ...; ``"comm"``: the
            collectives' byte count when the rows were split over ranks).
    """

    x: Tensor
    log_weights: Tensor
    rewards: Tensor
    nfe: float
    rows: range | Tensor
    ancestry: list[tuple[int, Tensor]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- base class
class _Population(Guidance):
    """A guidance method acting on groups of particles (the ``after_step`` level), usable in two ways:

    * ``gk.guide.sample(model, x, guidance=method, method="sde", ...)`` — one process, the whole batch;
    * ``method.run(model, x, cond, ...)`` — builds the sampler itself, optionally splitting the rows over
      ``torch.distributed`` ranks, and returns a :class:`PopulationOutput`.
    """

    def __init__(self, *, base: Guidance | None, n_particles: int | None, proposal: Callable | None, seed: int,
                 on_nonfinite: str, comm: Any):
        self.base = as_rule(base, Conditional())
        self.n_particles = None if n_particles is None else check_int("n_particles", n_particles, 1)
        if proposal is not None and not callable(proposal):
            raise ValueError("proposal must be None or a callable (x, t, t_next, cond, generator) -> x_next, "
                             f"got {type(proposal).__name__}")
        self.proposal = proposal
        self.seed = check_int("seed", seed, 0)
        self.on_nonfinite = check_nonfinite(on_nonfinite, POPULATION_POLICIES, where=type(self).__name__)
        if comm not in ("auto", None) and not _is_comm(comm):
            raise ValueError(f"comm must be 'auto', None or a gradkit.distributed.Comm, got {comm!r}")
        self.comm = comm
        # run-time (set by run(); defaults = one process, the sampler's whole batch)
        self._comm: Any = None
        self._rows: range | None = None
        self._total: int | None = None
        self._g: Callable[[float], float] | None = None
        self._times: Tensor | None = None
        self._own_sde = False
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed)
        self.rows = range(0)
        self.total = 0
        self.num_steps = 0
        self._vcache: tuple[int, Tensor, Tensor] | None = None   # (step, state, velocity) at a step's start

    # -- pickling: a Comm holds a process group
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_comm"] = None
        if _is_comm(state.get("comm")):
            state["comm"] = "auto"
        return state

    # -- groups and rows
    @property
    def group_size(self) -> int:
        return self.total if self.n_particles is None else self.n_particles

    @property
    def num_groups(self) -> int:
        return self.total // max(self.group_size, 1)

    def reset(self, x: Tensor, num_steps: int) -> None:
        b = x.shape[0]
        if self._rows is None:
            self.rows, self.total = range(b), b
        else:
            self.rows, self.total = self._rows, int(self._total)
            if len(self.rows) != b:
                raise ValueError(f"this rank holds {b} rows, expected {len(self.rows)}")
        if self.n_particles is not None and self.total % self.n_particles:
            raise ValueError(f"the batch ({self.total} rows) must be a multiple of n_particles={self.n_particles}")
        self.num_steps = num_steps
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed)
        self._vcache = None
        self.base.reset(x, num_steps)

    def _group_view(self, v: Tensor) -> Tensor:
        return v.reshape(self.num_groups, self.group_size)

    # -- velocity (with the cache filled by after_step at the next step's start point)
    def velocity(self, ctx: StepContext) -> Tensor:
        c = self._vcache
        if c is not None and ctx.stage == 0 and ctx.step == c[0] and ctx.x.data_ptr() == c[1].data_ptr() \
                and ctx.x.shape == c[1].shape:
            self._vcache = None
            return c[2]
        return self.base.velocity(ctx)

    def _remember_velocity(self, step: int, x: Tensor, v: Tensor) -> None:
        # the state itself is kept (not only its address): its memory cannot be reused by another tensor while
        # cached, and a deep copy / pickle of a sampler state keeps it aliased with the sampler's x
        self._vcache = (step, x, v)

    def _next_velocity(self, ctx: StepContext) -> Tensor:
        """The base velocity at the state just reached, evaluated as the next step's first evaluation (so rules
        that read the step index see the right one); :meth:`_remember_velocity` lets that step reuse it."""
        i = ctx.step + 1
        t = ctx.t
        if self._times is not None and i + 1 < self._times.numel():
            tn = float(self._times[i + 1])
        else:  # outside run(): the grid is not known; assume the same step size (only t_next-reading rules care)
            tn = min(1.0, t + (ctx.t - ctx.t_step))
        nxt = StepContext(x=ctx.x, t=t, t_next=tn, t_step=t, step=i, num_steps=ctx.num_steps, stage=0,
                          cond=ctx.cond, model=ctx.model, counter=ctx.counter, generator=ctx.generator,
                          method=ctx.method)
        return self.base.velocity(nxt)

    # -- the proposal (stochastic step)
    def step(self, ctx: StepContext) -> Tensor | None:
        if self.proposal is not None:
            return self.proposal(ctx.x, ctx.t, ctx.t_next, ctx.cond, ctx.generator)
        if self._own_sde:
            return self._sde_step(ctx)
        return None

    def _sde_step(self, ctx: StepContext) -> Tensor:
        # the sampler's Euler–Maruyama step with the marginal-preserving drift, written with the same operations
        # in the same order, except that the noise is drawn for the whole population and sliced to this rank's
        # rows: every rank's rows then see the noise they would see in one process
        x = ctx.x
        h = ctx.h
        t0 = ctx.t
        v = self.velocity(ctx)
        g = float(self._g(t0))
        drift = v + 0.5 * g * g * C.score_from_v(x, v, t0) if g != 0.0 else v
        noise = torch.randn((self.total, *x.shape[1:]), generator=ctx.generator, dtype=x.dtype, device=x.device)
        if len(self.rows) != self.total:
            noise = noise[self.rows.start:self.rows.stop]
        return x + h * drift + (g * abs(h) ** 0.5) * noise

    # -- rewards
    def _gather(self, compute: Callable[[], Tensor]) -> Tensor:
        """``[B]`` float64 from this rank's ``[len(rows)]`` values (all-gathered across ranks)."""
        if self._comm is None:
            return torch.as_tensor(compute(), dtype=f64).reshape(-1).cpu()
        return self._comm.gather_scalars(compute, self.total)

    def _rewards(self, reward: Callable[[Tensor], Any], x1: Tensor) -> Tensor:
        def compute() -> Tensor:
            r = reward(x1)
            r = torch.as_tensor(r).detach().to(f64).reshape(-1).cpu()
            if r.numel() != x1.shape[0]:
                raise ValueError(f"the reward must return one value per sample ([{x1.shape[0]}]), got "
                                 f"{r.numel()} values")
            return r

        return self._gather(compute)

    def _bad_rows(self, r: Tensor, what: str = "reward") -> Tensor:
        """A ``[B]`` mask of non-finite rewards under the policy (raise names the rows; ignore → none)."""
        if self.on_nonfinite == "ignore":
            return torch.zeros(r.shape, dtype=torch.bool)
        bad = ~torch.isfinite(r)
        if bool(bad.any()):
            if self.on_nonfinite == "raise":
                raise NonFiniteError(f"non-finite {what} for rows {bad.nonzero().flatten().tolist()[:20]}; nothing "
                                     "was updated (on_nonfinite='worst' gives them weight 0)")
            groups = self._group_view(bad).all(dim=1)
            if bool(groups.any()):
                raise NonFiniteError(f"every {what} of group(s) {groups.nonzero().flatten().tolist()} is non-finite: "
                                     "no particle to keep")
        return bad

    # -- moving rows after a resampling / selection
    def _split_of(self, rank: int) -> range:
        if self._comm is None:
            return range(self.total)
        return self._comm._split_of(rank, self.total)

    def _take(self, tensors: Sequence[Tensor | None], needs: Callable[[int], Tensor]) -> list[Tensor | None]:
        """This rank's new rows of each per-row tensor: row k of the result is global row ``needs(rank)[k]``.

        ``needs(q)`` gives the global source rows of rank q's result (every rank can compute it for every q:
        it is a function of shared decisions). Rows owned by another rank are fetched from it.
        """
        local = [t for t in tensors if t is not None]
        if self._comm is None:
            idx = needs(0)
            out = [t[idx] for t in local]
        else:
            out = _exchange(self._comm, local, self.rows, self.total, needs)
        it = iter(out)
        return [None if t is None else next(it) for t in tensors]

    def _resample_local(self, ancestors: Tensor, tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Apply global ancestors ``[B]`` to this rank's rows of each per-row tensor."""
        def needs(q: int) -> Tensor:
            r = self._split_of(q)
            return ancestors[r.start:r.stop]

        return self._take(tensors, needs)

    def _resampled(self, x: Tensor, ancestors: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """What ``after_step`` returns after a resampling: ``(x, index)`` so the sampler reorders a per-row
        condition (and the base rule its per-sample state), when every ancestor of this rank's rows is local; with
        rows from other ranks only ``x`` (a group's rows then must share their condition, as documented)."""
        mine = ancestors[self.rows.start:self.rows.stop]
        local = mine - self.rows.start
        if bool(((local >= 0) & (local < len(self.rows))).all()):
            self.base.reindex(local)
            return x, local
        return x

    # -- run: the sampler, optionally split over ranks
    def run(self, model: Any, x: Tensor, cond: Any = None, *, steps: int = 50, method: str = "sde",
            times: Sequence[float] | Tensor | None = None, g: float | Callable[[float], float] = 1.0,
            seed: int = 0, comm: Any = "default", gather: bool = False, **sampler_kw: Any) -> PopulationOutput:
        """Sample the population from the initial states ``x`` (every row, on every rank) and return the result.

        Args:
            model: ``(x, t, cond) -> prediction`` (see :class:`~gradkit.guide.FlowModel`).
            x: initial states ``[B, ...]`` of the whole population (the same on every rank).
            cond: the condition (per-row tensors are split with the rows).
            steps: number of sampler steps (default 50).
            method: the solver (default ``"sde"``: the marginal-preserving SDE, which the particle methods need;
                an ODE method leaves resampled copies identical).
            times: an explicit time grid (default: uniform from 0 to 1).
            g: the SDE diffusion ``g(t)``: a float g0 for ``g0·(1−t)`` (default 1.0) or a callable.
            seed: seed of the sampler's generator (the SDE noise; default 0). The method's own ``seed`` drives
                resampling / selection.
            comm: ``"auto"`` (split the rows over ranks when ``torch.distributed`` is initialised), ``None`` (one
                process) or a :class:`gradkit.distributed.Comm`; default: the method's ``comm``.
            gather: return every row's final state on every rank (default False: this rank's rows).
            **sampler_kw: further :class:`~gradkit.guide.Sampler` arguments (``t_start``, ``t_end``,
                ``on_nonfinite``, ...).
        """
        from ..distributed import resolve_comm
        from .sampler import Sampler, _g_fn

        resolved = resolve_comm(self.comm if comm == "default" else comm, self.seed)
        if resolved is not None:
            resolved.check_same(seed, "sampler seed")
        total = x.shape[0]
        rows = resolved.split(total) if resolved is not None else range(total)
        local_x = x[rows.start:rows.stop] if resolved is not None else x
        local_cond = index_cond(cond, torch.arange(rows.start, rows.stop)) if resolved is not None else cond
        sampler = Sampler(model, guidance=self, steps=steps, method=method, times=times, g=g, seed=seed,
                          **sampler_kw)
        self._comm, self._rows, self._total = resolved, rows, total
        self._g, self._times = _g_fn(g), sampler.times
        self._own_sde = method == "sde" and self.proposal is None
        try:
            out = sampler.run(local_x, local_cond)
            res = self._output(out.x, out.nfe)
            if gather and resolved is not None and isinstance(res.rows, range) and len(res.rows) != total:
                (res.x,) = self._take([res.x], lambda q: torch.arange(total))
                res.rows = range(total)
            if resolved is not None:
                res.info["comm"] = resolved.stats()
        finally:
            self._comm = None
            self._rows = self._total = None
            self._own_sde = False
            self._times = self._g = None
        return res

    def _output(self, x: Tensor, nfe: float) -> PopulationOutput:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    # -- state
    def _base_state(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "rng": self.generator.get_state(), "rows": (self.rows.start,
                self.rows.stop), "total": self.total, "num_steps": self.num_steps, "vcache": self._vcache}

    def _load_base_state(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        self.generator = torch.Generator()
        self.generator.set_state(state["rng"])
        self.rows = range(*state["rows"])
        self.total = int(state["total"])
        self.num_steps = int(state["num_steps"])
        self._vcache = state["vcache"]


def _is_comm(obj: Any) -> bool:
    from ..distributed import Comm

    return isinstance(obj, Comm)


def _exchange(comm: Any, tensors: list[Tensor], rows: range, total: int,
              needs: Callable[[int], Tensor]) -> list[Tensor]:
    """``t[needs(rank)]`` for per-row tensors ``t`` of which this rank holds only ``rows`` (of ``total``).

    Every rank derives, for every rank, the rows it must send (its own rows that another rank needs); those rows
    — and only those — go through one all-gather (float64, exact for every float dtype up to float64). Nothing
    is exchanged when no needed row lives on another rank (all ranks agree on that without talking).
    """
    world = comm.world
    splits = [comm._split_of(q, total) for q in range(world)]
    owner = torch.empty(total, dtype=torch.long)
    for q, r in enumerate(splits):
        owner[r.start:r.stop] = q
    want = [torch.as_tensor(needs(q), dtype=torch.long).reshape(-1) for q in range(world)]
    send: list[Tensor] = []
    for r in range(world):
        others = torch.cat([w for q, w in enumerate(want) if q != r] or [torch.empty(0, dtype=torch.long)])
        rows_r = torch.unique(others[owner[others] == r]) if others.numel() else torch.empty(0, dtype=torch.long)
        send.append(rows_r)
    m = max(int(s.numel()) for s in send)
    me = comm.rank
    flat = [t.reshape(t.shape[0], -1) for t in tensors]
    widths = [f.shape[1] for f in flat]
    source = torch.cat(flat, dim=1) if len(flat) > 1 else flat[0]
    pos = torch.full((total,), -1, dtype=torch.long)
    pos[rows.start:rows.stop] = torch.arange(len(rows))
    if m > 0:
        width = source.shape[1]
        mine = send[me]

        def compute() -> Tensor:
            packet = torch.zeros(m, width, dtype=f64)
            packet[:mine.numel()] = source[mine - rows.start].to(f64)
            return packet.reshape(-1)

        table = comm.gather_scalars(compute, world * m, per_item=width)
        if width == 1:
            table = table.reshape(-1, 1)
        source = torch.cat([source, table.to(source.dtype)], dim=0)
        for r in range(world):
            if r != me and send[r].numel():
                pos[send[r]] = len(rows) + r * m + torch.arange(send[r].numel())
    take = pos[want[me]]
    if bool((take < 0).any()):  # pragma: no cover - the send sets cover every need by construction
        raise RuntimeError("internal error: a needed row was not exchanged")
    picked = source[take]
    out, col = [], 0
    for t, w in zip(tensors, widths):
        out.append(picked[:, col:col + w].to(t.dtype).reshape(-1, *t.shape[1:]))
        col += w
    return out
