"""ForwardForward: each block learns to give high goodness to positive data and low goodness to negative data.

Paper: "The Forward-Forward Algorithm: Some Preliminary Investigations" (Hinton, 2022). Per block ``l`` with
output ``h_l`` (its input detached, so nothing is propagated between blocks):

    G_l(x) = Σ_j h_{l,j}²                                     (goodness: sum of squared activities)
    p(positive | x) = σ(G_l(x) − θ)
    L_l = mean over the 2B examples of  softplus(θ − G_l(x⁺)),  softplus(G_l(x⁻) − θ)

i.e. the logistic loss of "positive" for the real (image, label) pairs and of "negative" for the same images
with a wrong label. Supervised FF embeds the label in the input (the paper overwrites the first pixels of the
image with a one-hot label, ``embed="replace"``; ``embed="concat"`` appends it instead). Between blocks the
output is length-normalised without subtracting the mean (the paper's simple layer normalisation), so the next
block sees only the orientation of the activity vector, not its goodness. Prediction runs the network once per
candidate label and picks the label with the highest goodness accumulated over all blocks but the first
(``skip_first=True``, as in the paper; the first block can respond to the label pixels alone).

What we checked against the paper and public code (read, not copied): the goodness (sum of squares, the paper's
choice; ``goodness="mean"`` gives the mean of squares used by the widely read PyTorch re-implementation, whose
threshold is 2.0), the logistic form of the probability, the label overwrite of the first pixels, negative
data = the image with a uniformly drawn wrong label, normalisation between layers, the accumulated-goodness
prediction. The paper gives no numeric θ for its supervised MLP: our default ``threshold=None`` sets θ to the
block's width for ``"sum"`` (mean squared activity 1, the scale the normalisation gives the next input) and 2.0
for ``"mean"``. The length normalisation scales to unit root-mean-square (the paper's Matlab and the PyTorch
re-implementation differ in the constant; only the orientation matters for the next block's goodness up to
that constant).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_choice, check_int, check_positive
from ._local import LocalRule, block_widths

__all__ = ["ForwardForward"]


class ForwardForward(LocalRule):
    """Hinton's Forward-Forward as a gradient source: every block's ``.grad`` from its own goodness loss.

    The closure returns ``(x, y)``: inputs ``[B, features]`` (or any shape whose first ``n_classes`` flattened
    features are overwritten with ``embed="replace"``) and integer labels ``[B]``. Each call draws one wrong
    label per example (from the rule's seeded stream) and returns the sum of the blocks' losses.

    Args:
        blocks: the network as an ``nn.Sequential`` (cut after each activation) or a list of modules, one per
            block; each block should end in its nonlinearity (ReLU in the paper).
        n_classes: number of labels C embedded in the input.
        threshold: θ, one number for every block, or ``None`` (default): the block's width for
            ``goodness="sum"``, 2.0 for ``"mean"``.
        goodness: ``"sum"`` (default, the paper: Σ h²) or ``"mean"`` (mean of h²).
        normalize: length-normalise each block's output before the next block (default True, the paper).
        embed: ``"replace"`` (default, the paper: the first C input features become the one-hot label ×
            ``label_scale``) or ``"concat"`` (append the one-hot label; the first block then takes
            ``features + C`` inputs).
        label_scale: value of the "on" entry of the embedded one-hot label (default 1.0).
        negatives: ``"random"`` (default: a uniformly drawn wrong label per example) or a callable
            ``(x, y, generator) -> wrong labels``.
        skip_first: leave the first block out of the accumulated goodness at prediction (default True, the
            paper; ignored for a single block).
        example_input: one input batch, used only to infer block widths when a block has no ``nn.Linear``.
        seed: seed of the negative-label stream.
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"`` (see :class:`LocalRule`).
    """

    paper = "The Forward-Forward Algorithm: Some Preliminary Investigations"

    def __init__(self, blocks: nn.Module | Sequence[nn.Module], n_classes: int, *, threshold: float | None = None,
                 goodness: str = "sum", normalize: bool = True, embed: str = "replace", label_scale: float = 1.0,
                 negatives: str | Callable[..., torch.Tensor] = "random", skip_first: bool = True,
                 example_input: torch.Tensor | None = None, seed: int = 0, on_nonfinite: str = "raise"):
        super().__init__(blocks, seed=seed, on_nonfinite=on_nonfinite)
        self.n_classes = check_int("n_classes", n_classes, 2)
        self.goodness = check_choice("goodness", goodness, ("sum", "mean"))
        self.embed = check_choice("embed", embed, ("replace", "concat"))
        self.label_scale = check_positive("label_scale", label_scale)
        if not (negatives == "random" or callable(negatives)):
            raise ValueError(f"negatives must be 'random' or a callable (x, y, generator) -> labels, got {negatives!r}")
        self.negatives = negatives
        self.normalize = bool(normalize)
        self.skip_first = bool(skip_first)
        h = None if example_input is None else self.embed_labels(example_input, torch.zeros(
            example_input.shape[0], dtype=torch.long))
        self.widths = widths = block_widths(self.blocks, h)
        if threshold is None:
            self.thresholds = [float(w) if self.goodness == "sum" else 2.0 for w in widths]
        else:
            self.thresholds = [check_positive("threshold", threshold)] * len(widths)

    # -- the rule ---------------------------------------------------------------------------------------------
    def embed_labels(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``x`` with the one-hot ``labels`` embedded (overwriting the first C features, or appended)."""
        flat = x.reshape(x.shape[0], -1)
        onehot = F.one_hot(labels, self.n_classes).to(flat.dtype) * self.label_scale
        if self.embed == "concat":
            return torch.cat([flat, onehot], dim=1)
        if flat.shape[1] < self.n_classes:
            raise ValueError(f"embed='replace' needs at least n_classes={self.n_classes} input features, "
                             f"got {flat.shape[1]}")
        return torch.cat([onehot, flat[:, self.n_classes:]], dim=1).reshape(x.shape)

    def goodness_of(self, h: torch.Tensor) -> torch.Tensor:
        """G(h) per example: Σ h² (``"sum"``) or mean h² (``"mean"``) over all but the batch dimension."""
        sq = h.reshape(h.shape[0], -1).square()
        return sq.sum(1) if self.goodness == "sum" else sq.mean(1)

    @staticmethod
    def layer_norm(h: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """The paper's normalisation between blocks: divide by the root-mean-square, no mean subtracted."""
        flat = h.reshape(h.shape[0], -1)
        return (flat / (flat.square().mean(1, keepdim=True) + eps).sqrt()).reshape(h.shape)

    def negative_labels(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One wrong label per example, drawn from the rule's stream (the draw ``estimate`` makes first)."""
        if callable(self.negatives):
            neg = self.negatives(x, y, self.generator)
        else:
            shift = torch.randint(1, self.n_classes, y.shape, generator=self.generator).to(y.device)
            neg = (y + shift) % self.n_classes
        if bool((neg == y).any()):
            raise ValueError("negatives must differ from the true labels")
        return neg

    def block_loss(self, i: int, h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
        """L_i from the block's outputs on positive and negative data (the logistic loss around θ_i)."""
        theta = self.thresholds[i]
        return torch.cat([F.softplus(theta - self.goodness_of(h_pos)),
                          F.softplus(self.goodness_of(h_neg) - theta)]).mean()

    def _block_input(self, i: int, h: torch.Tensor) -> torch.Tensor:
        h = h.detach()
        return self.layer_norm(h) if (i > 0 and self.normalize) else h

    def _local_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        neg = self.negative_labels(x, y)
        b = x.shape[0]
        h = torch.cat([self.embed_labels(x, y), self.embed_labels(x, neg)])
        total = None
        for i, block in enumerate(self.blocks):
            out = block(self._block_input(i, h))
            loss = self.block_loss(i, out[:b], out[b:])
            total = loss.detach() if total is None else total + loss.detach()
            self._grad(loss, self._trainable(block), f"block {i}")
            h = out.detach()
        return total

    # -- prediction -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def label_goodness(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C]``: goodness accumulated over the blocks (all but the first with ``skip_first``) for every
        candidate label."""
        b, c = x.shape[0], self.n_classes
        labels = torch.arange(c, device=x.device).repeat_interleave(b)
        h = self.embed_labels(x.repeat(c, *([1] * (x.dim() - 1))), labels)
        acc = torch.zeros(c * b, dtype=torch.float64, device=x.device)
        first = 1 if (self.skip_first and len(self.blocks) > 1) else 0
        for i, block in enumerate(self.blocks):
            h = block(self._block_input(i, h))
            if i >= first:
                acc += self.goodness_of(h).to(torch.float64)
        return acc.view(c, b).T

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The label with the highest accumulated goodness (one forward per candidate label)."""
        return self.label_goodness(x).argmax(1)
