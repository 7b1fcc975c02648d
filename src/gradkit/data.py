"""Data that ships with our dependencies: scikit-learn's digits and text from Python's standard library.

Nothing here touches the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CharCorpus", "digits", "pydoc_text"]


def digits(test_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32):
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes), standardised with training statistics.

    Returns ``(x_train, y_train, x_test, y_test)``; the split is a seeded permutation.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - the demo/test extras install it
        raise ImportError("digits() needs scikit-learn: pip install 'gradkit[demo]'") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)
    x = ((x - mean) / std).to(dtype)
    return x[train], y[train], x[test], y[test]


def pydoc_text() -> str:
    """About 465 k characters of English technical prose: the Python reference topics in ``pydoc_data``."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


@dataclass
class CharCorpus:
    """A character-level corpus split into train/validation ids, with seeded batch sampling.

    ``CharCorpus.pydoc()`` builds it from :func:`pydoc_text` (last ``val_fraction`` held out).
    """

    chars: str
    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_text(cls, text: str, val_fraction: float = 0.1) -> CharCorpus:
        chars = "".join(sorted(set(text)))
        index = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        n_val = int(len(ids) * val_fraction)
        return cls(chars, ids[: len(ids) - n_val], ids[len(ids) - n_val:])

    @classmethod
    def pydoc(cls, val_fraction: float = 0.1) -> CharCorpus:
        return cls.from_text(pydoc_text(), val_fraction)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, split: str, batch_size: int, block: int, generator: torch.Generator):
        """``(x, y)`` of shape ``[batch_size, block]``: random windows and the next characters."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - block - 1, (batch_size,), generator=generator)
        offsets = torch.arange(block)
        x = data[starts[:, None] + offsets]
        y = data[starts[:, None] + offsets + 1]
        return x, y

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)
