"""The one "has no state" default of ``state_dict`` / ``load_state_dict``, shared by every stage protocol.

Sources, transforms and controllers (and anything else that checkpoints with a run) subclass :class:`Stateful`;
a class with state overrides both methods so that ``load_state_dict(state_dict())`` restores it bit for bit.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Copyable", "Stage", "Stateful"]


class Copyable:
    """``copy.deepcopy`` and ``pickle`` keep every attribute (a copy steps exactly as the original would).

    ``torch.optim.Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``, so a subclass's
    own attributes (kernel, non-finite policy, counters, generators) were lost in a copy. This keeps them all but
    torch's hook registries (``_optimizer_*_hooks``, which may hold unpicklable callables and which torch drops as
    well); ``__setstate__`` then hands over to the next class's ``__setstate__`` when there is one (torch's, which
    recreates the hook registries), so the mixin works before ``torch.optim.Optimizer`` in a class's bases.
    """

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not (k.startswith("_optimizer_") and k.endswith("hooks"))}

    def __setstate__(self, state: dict[str, Any]) -> None:
        parent = getattr(super(), "__setstate__", None)
        if parent is not None:
            parent(state)
        else:
            self.__dict__.update(state)


class Stateful(Copyable):
    """``state_dict()`` returns ``{}``; ``load_state_dict`` accepts only an empty state.

    Loading a non-empty state into a stateless piece raises ``ValueError`` naming the class and the keys, so a
    checkpoint never loads silently into the wrong stage.
    """

    def state_dict(self) -> dict[str, Any]:
        """The state a resumed run needs (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; a stateless piece accepts only ``{}``."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


class Stage(Stateful):
    """A stage of the data path (source, transform, controller): state plus the statistics of its last step.

    The one statistics protocol: ``stats()`` returns ``{name: value}`` for the most recent step (numbers or
    tensors; empty when there is nothing to report). :class:`gradkit.Pipeline` keys them by the stage's name and
    :mod:`gradkit.logging` writes them. The default returns what the stage recorded in ``_last_stats``
    (transforms record the dict their call returned); a stage may override it to compute statistics on demand.
    """

    _last_stats: dict[str, Any] | None = None

    def stats(self) -> dict[str, Any]:
        """Statistics of the most recent step (a fresh dict; empty if none)."""
        return dict(self._last_stats or {})
