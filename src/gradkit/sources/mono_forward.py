"""MonoForward: each block projects its activations to class scores with its own matrix and minimises their
cross-entropy.

Paper: "Mono-Forward: Backpropagation-Free Algorithm for Efficient Neural Network Training Harnessing Local
Errors" (Gong, Li & Abdulla, 2025). For block ``i`` with output activations ``a_i`` (input detached) and its
projection matrix ``M_i ∈ R^{C × n_i}`` (the "goodness" matrix, trained with the block):

    G_i = a_i M_iᵀ                 (goodness scores, one per class)
    L_i = CE(softmax(G_i), y)      (cross-entropy on the block's own scores)

so block ``i``'s weights and ``M_i`` get ``∇L_i`` and nothing else. One forward pass per step, no negative data.
Prediction uses the scores of the last block (the paper's default one-pass prediction) or their sum over
blocks (``predict(x, layers="all")``, the FF-style accumulation the paper also reports), or any list of blocks.

What we checked (the paper's abstract, its published summaries and the algorithm as described: read, not
copied): ``G = a Mᵀ`` with a per-layer learnable projection of shape classes × units, softmax cross-entropy on
``G`` as the only loss of the layer, a single forward pass, prediction from the last layer's scores or an
aggregation over layers. The projections have no bias (``G = a Mᵀ``); their initialisation is not stated in
what we could read: we use ``nn.Linear``'s default (uniform ±1/√n_i), seeded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_int
from ._local import LocalRule, as_blocks, block_widths

__all__ = ["MonoForward"]


class MonoForward(LocalRule):
    """Mono-Forward as a gradient source: block ``i`` and its projection ``M_i`` learn from CE(a_i M_iᵀ, y).

    The closure returns ``(x, y)`` (inputs, integer labels). Returns the sum over blocks of the local
    cross-entropies. ``projections`` (an ``nn.ModuleList`` of bias-free ``nn.Linear(n_i, C)``) is part of
    ``parameters()`` and of ``state_dict()``.

    Args:
        blocks: the network as an ``nn.Sequential`` (cut after each activation) or a list of modules, one per
            block. Every block is trained, including the last (its projection is the classifier).
        n_classes: C, the number of classes.
        example_input: one input batch, used only to infer block widths when a block has no ``nn.Linear``
            (e.g. convolutional blocks: their output is flattened before the projection).
        seed: seed of the projections' initialisation.
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"`` (see :class:`LocalRule`).
    """

    paper = "Mono-Forward: Backpropagation-Free Algorithm for Efficient Neural Network Training Harnessing Local Errors"

    def __init__(self, blocks: nn.Module | Sequence[nn.Module], n_classes: int, *,
                 example_input: torch.Tensor | None = None, seed: int = 0, on_nonfinite: str = "raise"):
        n_classes = check_int("n_classes", n_classes, 2)
        blist = as_blocks(blocks)
        widths = block_widths(blist, example_input)
        first = next(iter(blist.parameters()), None)
        kw = {} if first is None else {"dtype": first.dtype, "device": first.device}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(check_int("seed", seed, 0))
            projections = nn.ModuleList(nn.Linear(w, n_classes, bias=False, **kw) for w in widths)
        aux = nn.Module()
        aux.projections = projections
        super().__init__(blist, aux, seed=seed, on_nonfinite=on_nonfinite)
        self.n_classes = n_classes
        self.projections = projections
        self.widths = widths

    def scores(self, i: int, a: torch.Tensor) -> torch.Tensor:
        """G_i = a_i M_iᵀ (``a`` flattened per example)."""
        return self.projections[i](a.reshape(a.shape[0], -1))

    def _local_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x
        total = None
        for i, block in enumerate(self.blocks):
            a = block(h.detach())
            loss = F.cross_entropy(self.scores(i, a), y)
            total = loss.detach() if total is None else total + loss.detach()
            self._grad(loss, self._trainable(block, self.projections[i]), f"block {i}")
            h = a.detach()
        return total

    @torch.no_grad()
    def logits(self, x: torch.Tensor, layers: str | Sequence[int] = "last") -> torch.Tensor:
        """Class scores for prediction: the last block's G (``"last"``), the sum of every block's (``"all"``),
        or the sum over the listed block indices."""
        n = len(self.blocks)
        if layers == "last":
            chosen = {n - 1}
        elif layers == "all":
            chosen = set(range(n))
        elif isinstance(layers, str):
            raise ValueError(f"layers must be 'last', 'all' or a list of block indices, got {layers!r}")
        else:
            chosen = {int(i) % n for i in layers}
            if not chosen:
                raise ValueError("layers must name at least one block")
        out = None
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in chosen:
                g = self.scores(i, h)
                out = g if out is None else out + g
            if i >= max(chosen):
                break
        return out

    def predict(self, x: torch.Tensor, layers: str | Sequence[int] = "last") -> torch.Tensor:
        """argmax of :meth:`logits`."""
        return self.logits(x, layers).argmax(1)
