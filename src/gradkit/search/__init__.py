"""Black-box population search over tensors (ask/tell)."""

__all__: list[str] = []
