"""The five-stage data path: objective → source → transforms → optimizer → controllers, with named stages.

Every stage has a unique name (optax's ``named_chain`` in spirit): given with :func:`named` or a mapping
``{name: stage}``, or derived from the class in snake case and de-duplicated (``clip_norm``, ``clip_norm_1``).
``Pipeline.stats`` and ``Pipeline.state_dict()`` are keyed by these names, so two stages of one class never
collide and a checkpoint never loads into the wrong stage by position.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ._kernels import all_finite
from ._validate import NONFINITE_SINGLE, check_nonfinite
from .control.base import Controller
from .errors import NonFiniteError
from .optim._base import Optimizer as _GkOptimizer
from .sources.base import Closure, Source
from .transforms.base import Transform

__all__ = ["Named", "Pipeline", "named", "stage_name"]

_NO_SNAPSHOT = object()


class Named(NamedTuple):
    """A stage with the name it has in a :class:`Pipeline` (built by :func:`named`).

    Args:
        name: the stage's name in the Pipeline.
        stage: the source, transform, optimizer or controller.
    """

    name: str
    stage: Any


def named(name: str, stage: Any) -> Named:
    """Give a Pipeline stage its name: ``Pipeline(named("zo", SPSA(m)), [named("clip", ClipNorm(1.0))], ...)``.

    Args:
        name: a non-empty string without ``/`` (``/`` separates the stage name from a statistic's name), unique
            within the Pipeline.
        stage: the source, transform, optimizer or controller.
    """
    _check_name(name)
    return Named(name, stage)


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"a stage name must be a non-empty string without '/', got {name!r}")
    return name


def stage_name(obj: Any) -> str:
    """The derived name of a stage: its class name in snake case (``ClipNorm`` → ``clip_norm``, ``AGC`` → ``agc``).

    A single trailing capital stays with its word (``AdamW`` → ``adamw``, ``LDoG`` → ``l_dog``).
    """
    name = type(obj).__name__
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])(?!$)", r"\1_\2", name).lower()


def _entries(stages: Sequence[Any] | Mapping[str, Any] | None, role: str) -> list[tuple[str | None, Any]]:
    """``[(given name or None, stage)]`` from a sequence (of stages or :class:`Named`) or a mapping."""
    if stages is None:
        return []
    if isinstance(stages, Mapping):
        return [(_check_name(k), v) for k, v in stages.items()]
    if isinstance(stages, (Named, Source, Transform, Controller, torch.optim.Optimizer)) or not isinstance(
            stages, Iterable):
        raise ValueError(f"{role} must be a sequence or a mapping {{name: stage}}, got {type(stages).__name__}")
    return [(s.name, s.stage) if isinstance(s, Named) else (None, s) for s in stages]


def _unwrap(stage: Any) -> tuple[str | None, Any]:
    return (stage.name, stage.stage) if isinstance(stage, Named) else (None, stage)


class Pipeline:
    """One training step through every stage, each swappable, each named.

    ``step(closure)``: ``loss = source.estimate(closure)``; the loss and gradients are checked; each transform
    edits the gradients; ``optimizer.step()``; ``optimizer.zero_grad(set_to_none=True)``; each controller's
    ``after_step(loss)``. Returns the loss (detached).

    Stage names: ``transforms`` and ``controllers`` may be sequences (of stages, or of :func:`named` stages) or
    mappings ``{name: stage}``; ``source`` and ``optimizer`` may be :func:`named`. Unnamed stages get their class
    name in snake case, de-duplicated in pipeline order (``clip_norm``, ``clip_norm_1``). One object in two roles
    (a GradES that is both transform and controller, ZOSGD as source and optimizer) is one stage with one name.
    :attr:`stages` maps names to stages in pipeline order; :attr:`stats` holds every stage's last statistics as
    ``"<name>/<statistic>"``; :meth:`state_dict` is ``{"stages": {name: state}, "steps", "skipped"}``.

    Args:
        source: the :class:`~gradkit.sources.Source` (how gradients are obtained).
        transforms: gradient transforms, in order (a sequence or ``{name: transform}``). Default none.
        optimizer: a ``torch.optim.Optimizer`` (gradkit's or torch's).
        controllers: controllers called after each step (a sequence or ``{name: controller}``). Default none.
        on_nonfinite: what a NaN/Inf loss or gradient from the source does (README, "Non-finite values"):
            ``"raise"`` (default) raises :class:`~gradkit.NonFiniteError` before any transform, optimizer or
            controller has run, with the source's state restored and the gradients cleared; ``"skip"`` does the
            same silently, counts the step in ``skipped`` and returns a NaN loss; ``"ignore"`` does not check (each
            stage still applies its own ``on_nonfinite``). A stage that skipped by its own policy (e.g. a source
            with ``on_nonfinite="skip"``) makes the whole step a skip. After a raise or a skip the parameters and
            every stage's state are exactly as before the call.
    """

    def __init__(self, source: Source | Named, transforms: Sequence[Any] | Mapping[str, Any] = (),
                 optimizer: torch.optim.Optimizer | Named | None = None,
                 controllers: Sequence[Any] | Mapping[str, Any] = (), *, on_nonfinite: str = "raise"):
        source_name, source = _unwrap(source)
        optimizer_name, optimizer = _unwrap(optimizer)
        t_entries = _entries(transforms, "transforms")
        c_entries = _entries(controllers, "controllers")
        if not isinstance(source, Source):
            raise ValueError(f"source must be a gradkit Source, got {type(source).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for _, t in t_entries:
            if not callable(t):
                raise ValueError(f"transforms must be callables on parameters, got {type(t).__name__}")
        for _, c in c_entries:
            if not hasattr(c, "after_step"):
                raise ValueError(f"controllers must have after_step(loss), got {type(c).__name__}")
        self.source = source
        self.transforms = [t for _, t in t_entries]
        self.optimizer = optimizer
        self.controllers = [c for _, c in c_entries]
        self.on_nonfinite = check_nonfinite(on_nonfinite, NONFINITE_SINGLE, where="Pipeline")
        self._name_stages([(source_name, source), *t_entries, (optimizer_name, optimizer), *c_entries])
        self._check_compatible()
        self.steps = 0
        self.skipped = 0
        self._call_stats: dict[str, dict[str, Any]] = {}  # what plain-callable transforms returned last

    # -- names -----------------------------------------------------------------------------------------------
    def _name_stages(self, entries: list[tuple[str | None, Any]]) -> None:
        given: dict[int, str] = {}
        for name, stage in entries:
            if name is None:
                continue
            if given.get(id(stage), name) != name:
                raise ValueError(f"one stage was given two names: {given[id(stage)]!r} and {name!r}")
            if name in given.values() and given.get(id(stage)) != name:
                raise ValueError(f"two stages are named {name!r}: stage names must be unique")
            given[id(stage)] = name
        taken = set(given.values())
        self.stages: dict[str, Any] = {}
        self._names: dict[int, str] = {}
        for _, stage in entries:
            if id(stage) in self._names:
                continue  # one object in two roles: one stage
            name = given.get(id(stage))
            if name is None:
                base = stage_name(stage)
                name, i = base, 0
                while name in taken:
                    i += 1
                    name = f"{base}_{i}"
                taken.add(name)
            self._names[id(stage)] = name
            self.stages[name] = stage

    # -- copies: stage names are looked up by identity, which a copy changes -------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_names"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._names = {id(stage): name for name, stage in self.stages.items()}

    def name_of(self, stage: Any) -> str:
        """The name of ``stage`` in this Pipeline."""
        try:
            return self._names[id(stage)]
        except KeyError:
            raise ValueError(f"{type(stage).__name__} is not a stage of this Pipeline") from None

    def _check_compatible(self) -> None:
        """Incompatibilities that would otherwise surface only after the optimizer moved the parameters."""
        t_ids = {id(t) for t in self.transforms}
        for c in self.controllers:
            name = self.name_of(c)
            if getattr(c, "needs_backward", False) and not self.source.runs_backward:
                raise ValueError(
                    f"controller {name!r} observes gradients through autograd hooks, but the source "
                    f"{type(self.source).__name__} runs no backward pass: build it with observe='transform' and "
                    "add the same object to the transforms")
            if getattr(c, "needs_transform", False) and id(c) not in t_ids:
                raise ValueError(f"controller {name!r} reads .grad as a transform (observe='transform'): "
                                 "add the same object to the Pipeline's transforms too")
        if getattr(self.optimizer, "needs_graph", False) and not getattr(self.source, "create_graph", False):
            raise ValueError(
                f"{type(self.optimizer).__name__} differentiates through the gradient: use a source that builds its "
                "graph, e.g. gk.sources.Backprop(model, create_graph=True)")

    # -- stepping ----------------------------------------------------------------------------------------------
    @property
    def should_stop(self) -> bool:
        """True once any controller asks training to stop."""
        return any(getattr(c, "should_stop", False) for c in self.controllers)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _skip(self, snap: Any, err: NonFiniteError | None) -> torch.Tensor:
        # The source may have advanced its random stream: put it back, so a skip changes nothing.
        if snap is not _NO_SNAPSHOT:
            self.source.restore(snap)
        self.optimizer.zero_grad(set_to_none=True)
        if err is not None and self.on_nonfinite == "raise":
            raise err
        self.skipped += 1
        return torch.tensor(float("nan"))

    def step(self, closure: Closure) -> torch.Tensor:
        """One step of every stage; returns the loss (NaN when the step was skipped)."""
        src = self.source
        # A source that checks and rolls back by itself needs no second snapshot: after it returns normally its
        # loss and gradients are finite (so nothing below rolls it back), and on an error it has restored itself.
        guarded = src.self_guarded and src.on_nonfinite != "ignore"
        snap = _NO_SNAPSHOT if guarded else src.snapshot()
        skips = getattr(src, "nonfinite_skips", 0)
        try:
            loss = src.estimate(closure)
        except NonFiniteError as err:
            if self.on_nonfinite == "ignore":
                if snap is not _NO_SNAPSHOT:
                    src.restore(snap)
                raise
            return self._skip(snap, err)
        if getattr(src, "nonfinite_skips", 0) != skips:
            return self._skip(snap, None)  # the source skipped by its own policy
        params = self._params()
        checked = bool(getattr(src, "checked_finite", False))
        if self.on_nonfinite != "ignore" and not checked:
            if not all_finite([loss.detach(), *(p.grad for p in params if p.grad is not None)]):
                return self._skip(snap, NonFiniteError("a loss or gradient is NaN or Inf; nothing was updated"))
            checked = True
        for name, t in zip(map(self.name_of, self.transforms), self.transforms):
            out = t(params)
            if not isinstance(t, Transform):
                self._call_stats[name] = out if isinstance(out, dict) else {}
        # The gradients were found finite and no transform can have made them otherwise: the optimizer's own
        # check would repeat the same pass and host synchronisation.
        trust = checked and isinstance(self.optimizer, _GkOptimizer) and all(
            getattr(t, "keeps_finite", False) for t in self.transforms)
        if trust:
            self.optimizer._grads_checked = True
        try:
            self.optimizer.step()
        finally:
            if trust:
                self.optimizer._grads_checked = False
        self.optimizer.zero_grad(set_to_none=True)
        for c in self.controllers:
            c.after_step(loss)
        self.steps += 1
        return loss

    @property
    def stats(self) -> dict[str, Any]:
        """The last step's statistics of every stage that reports any, as ``{"<stage name>/<statistic>": value}``.

        Transforms report what their last call returned, controllers their ``stats()`` (the stage protocol of
        :class:`gradkit._stateful.Stage`); values are numbers or tensors, converted by :mod:`gradkit.logging`.
        """
        out: dict[str, Any] = {}
        for name, stage in self.stages.items():
            fn = getattr(stage, "stats", None)
            values = fn() if callable(fn) else self._call_stats.get(name, {})
            out.update({f"{name}/{k}": v for k, v in values.items()})
        return out

    # -- checkpointing -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"stages": {name: stage.state_dict()}, "steps": int, "skipped": int}``."""
        return {
            "stages": {n: s.state_dict() if hasattr(s, "state_dict") else {} for n, s in self.stages.items()},
            "steps": self.steps,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; stages are matched by name, and any mismatch raises before anything loads."""
        if "stages" not in state:
            raise ValueError("not a Pipeline state_dict keyed by stage names (expected a 'stages' entry; states "
                             "saved by gradkit 0.1 match stages by position and cannot be loaded)")
        saved = state["stages"]
        missing = [n for n in self.stages if n not in saved]
        unexpected = [n for n in saved if n not in self.stages]
        if missing or unexpected:
            raise ValueError(f"the state's stage names do not match this Pipeline's: missing {missing}, "
                             f"unexpected {unexpected} (this Pipeline has {list(self.stages)})")
        for name, stage in self.stages.items():
            if hasattr(stage, "load_state_dict"):
                stage.load_state_dict(saved[name])
            elif saved[name]:
                raise ValueError(f"stage {name!r} has no state, got keys {sorted(saved[name])}")
        self.steps = int(state["steps"])
        self.skipped = int(state["skipped"])

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={type(s).__name__}" for n, s in self.stages.items())
        return f"Pipeline({inner})"
