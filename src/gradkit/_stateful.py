"""The one "has no state" default of ``state_dict`` / ``load_state_dict``, shared by every stage protocol.

Sources, transforms and controllers (and anything else that checkpoints with a run) subclass :class:`Stateful`;
a class with state overrides both methods so that ``load_state_dict(state_dict())`` restores it bit for bit.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Stateful"]


class Stateful:
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
