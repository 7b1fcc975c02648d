"""Framework-free helpers shared by the integrations: find gradkit stages on an object, save and load their states.

A *stage* is anything of gradkit's that carries training state outside the model's parameters and the framework's
optimizer list: a :class:`~gradkit.Pipeline`, a gradient source, a transform, a controller, a searcher. Frameworks
checkpoint the model and the optimizers they know; these helpers let an integration add the rest, keyed by a stable
name (the attribute path on the user's module), so a state never loads into the wrong stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .._stateful import Stateful
from ..pipeline import Pipeline
from ..search.base import Searcher
from ..sources.base import Source

STAGE_TYPES = (Pipeline, Source, Stateful, Searcher)


def is_stage(obj: Any) -> bool:
    """True for the gradkit objects whose state an integration checkpoints."""
    return isinstance(obj, STAGE_TYPES) and hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")


def find_stages(owner: Any) -> dict[str, Any]:
    """``{attribute path: stage}`` of the gradkit stages held by ``owner``'s attributes.

    Looks at ``owner``'s own attributes and one level into lists, tuples and dicts (``self.transforms[0]`` is named
    ``"transforms.0"``); does not descend into child ``torch.nn.Module``s, nor into a Pipeline (its
    ``state_dict`` already holds its stages). A stage reachable by two names is kept under the first.
    """
    out: dict[str, Any] = {}
    seen: set[int] = set()

    def visit(name: str, value: Any) -> None:
        if is_stage(value):
            if id(value) not in seen:
                seen.add(id(value))
                out[name] = value
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if is_stage(v) and id(v) not in seen:
                    seen.add(id(v))
                    out[f"{name}.{i}"] = v
        elif isinstance(value, Mapping):
            for k, v in value.items():
                if isinstance(k, str) and is_stage(v) and id(v) not in seen:
                    seen.add(id(v))
                    out[f"{name}.{k}"] = v

    for name, value in sorted(vars(owner).items()):
        if not name.startswith("_"):
            visit(name, value)
    # Stages inside a Pipeline travel in the Pipeline's own state: drop them when found separately too.
    inner = {id(s) for p in out.values() if isinstance(p, Pipeline)
             for s in (p.source, *p.transforms, *p.controllers)}
    return {k: v for k, v in out.items() if id(v) not in inner}


def collect_states(stages: Mapping[str, Any], skip_optimizers: Iterable[torch.optim.Optimizer] = ()) -> dict[str, Any]:
    """``{name: state_dict}``; a Pipeline whose optimizer the framework checkpoints itself is saved without it.

    A stage that *is* one of ``skip_optimizers`` (``ZOSGD``, both source and optimizer) is left to the framework.
    """
    skip = {id(o) for o in skip_optimizers}
    out: dict[str, Any] = {}
    for name, stage in stages.items():
        if id(stage) in skip:
            continue
        state = stage.state_dict()
        if isinstance(stage, Pipeline) and id(stage.optimizer) in skip:
            # Restored by the framework; filled in again at load time.
            state = {**state, "stages": {**state["stages"], stage.name_of(stage.optimizer): None}}
        out[name] = state
    return out


def restore_states(stages: Mapping[str, Any], states: Mapping[str, Any],
                   skip_optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Load ``states`` (from :func:`collect_states`) into ``stages``; names must match exactly.

    Raises:
        ValueError: a saved stage has no counterpart, or a stage has no saved state (naming them): resuming with a
            stage missing its state would silently restart it (e.g. repeat a source's random directions).
    """
    skip = {id(o) for o in skip_optimizers}
    expected = {n for n, s in stages.items() if id(s) not in skip}
    missing, unexpected = sorted(expected - set(states)), sorted(set(states) - expected)
    if missing or unexpected:
        raise ValueError(
            "the checkpoint's gradkit stages do not match this run's: "
            + (f"no saved state for {missing}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"saved states without a stage: {unexpected}" if unexpected else "")
            + ". Stages are named by their attribute path on the module; give them the same names as when saved."
        )
    for name in sorted(expected):
        stage, state = stages[name], states[name]
        if isinstance(stage, Pipeline) and isinstance(state, Mapping) and isinstance(state.get("stages"), Mapping):
            opt_name = stage.name_of(stage.optimizer)
            if opt_name in state["stages"] and state["stages"][opt_name] is None:
                state = {**state, "stages": {**state["stages"], opt_name: stage.optimizer.state_dict()}}
        stage.load_state_dict(state)


def is_zeroth_order(optimizer: Any) -> bool:
    """True for an optimizer that evaluates the closure itself to estimate its step (e.g. ``ZOSGD``)."""
    return isinstance(getattr(optimizer, "optimizer", optimizer), Source) or isinstance(optimizer, Source)


def is_schedule_free(optimizer: Any) -> bool:
    """True for an optimizer with ``train()`` / ``eval()`` modes (gradkit's and the ``schedulefree`` package's)."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None)) \
        and isinstance(optimizer, torch.optim.Optimizer)


def in_train_mode(optimizer: Any) -> bool:
    """Whether a Schedule-Free optimizer's parameters hold the training point y (not the average x)."""
    training = getattr(optimizer, "training", None)
    if isinstance(training, bool):
        return training
    return all(g.get("train_mode", True) for g in optimizer.param_groups)
