"""Data that ships with our dependencies: scikit-learn's digits and text from Python's standard library.

Nothing here touches the network.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["CharCorpus", "digits", "pydoc_corpus", "pydoc_text"]


def digits(test_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32, *,
           low: float = -1.0, high: float = 1.0):
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes), pixels mapped linearly to ``[low, high]``.

    The raw pixels are integers 0…16; they are mapped by the fixed affine map 0 → ``low``, 16 → ``high``
    (default ``[-1, 1]``, the convention of the guided-sampling test-bed), so every input lies in the same
    bounded range whatever the split. (Per-pixel standardisation with training statistics, the earlier
    scaling, sent a pixel that is constant in the training split to ≈ 1000 on a test image.)

    Args:
        test_fraction: Share of the 1,797 images held out for testing, in (0, 1). Default 0.25.
        seed: Seed of the permutation that splits train from test. Default 0.
        dtype: Floating dtype of the images. Default float32.
        low: Value of a blank (0) pixel. Default -1.
        high: Value of a saturated (16) pixel; must exceed ``low``. Default 1.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images ``[n, 64]`` and integer labels ``[n]``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"low and high must be finite with high > low, got low={low}, high={high}")
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
    x = (low + (high - low) * x / 16.0).to(dtype)
    return x[train], y[train], x[test], y[test]


def pydoc_text() -> str:
    """About 465 k characters of English technical prose: the Python reference topics in ``pydoc_data``."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


@dataclass
class CharCorpus:
    """A character-level corpus split into train/validation ids, with seeded batch sampling.

    ``CharCorpus.pydoc()`` builds it from :func:`pydoc_text` (last ``val_fraction`` held out).

    Args:
        chars: The alphabet, sorted; a character's id is its index.
        train: Training ids (1-D long tensor).
        val: Validation ids (1-D long tensor).
    """

    chars: str
    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_text(cls, text: str, val_fraction: float = 0.1) -> CharCorpus:
        """Split ``text`` into train ids and the last ``val_fraction`` as validation ids.

        Args:
            text: The corpus.
            val_fraction: Share held out (the end of the text). Default 0.1.
        """
        chars = "".join(sorted(set(text)))
        index = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        n_val = int(len(ids) * val_fraction)
        return cls(chars, ids[: len(ids) - n_val], ids[len(ids) - n_val:])

    @classmethod
    def pydoc(cls, val_fraction: float = 0.1) -> CharCorpus:
        """The corpus of :func:`pydoc_text`.

        Args:
            val_fraction: Share held out. Default 0.1.
        """
        return cls.from_text(pydoc_text(), val_fraction)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, split: str, batch_size: int, block: int, generator: torch.Generator):
        """``(x, y)`` of shape ``[batch_size, block]``: random windows and the next characters.

        Args:
            split: ``"train"`` or ``"val"``.
            batch_size: Number of windows.
            block: Window length.
            generator: Source of the window positions.
        """
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - block - 1, (batch_size,), generator=generator)
        offsets = torch.arange(block)
        x = data[starts[:, None] + offsets]
        y = data[starts[:, None] + offsets + 1]
        return x, y

    def decode(self, ids) -> str:
        """The text of a sequence of ids.

        Args:
            ids: Character ids.
        """
        return "".join(self.chars[int(i)] for i in ids)


@functools.lru_cache(maxsize=1)
def pydoc_corpus() -> CharCorpus:
    """``CharCorpus.pydoc()``, built once per process (tokenising 465 k characters takes a moment)."""
    return CharCorpus.pydoc()
