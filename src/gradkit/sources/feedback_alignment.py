"""FeedbackAlignment (direct feedback alignment): the output error reaches every hidden block through a fixed
random matrix instead of the transposed forward weights.

Papers: "Direct Feedback Alignment Provides Learning in Deep Neural Networks" (Nøkland, 2016); studied at scale
in "Principled Training of Neural Networks with Direct Feedback Alignment" (Launay, Poli & Krzakala, 2019).
With e = ∂L/∂ŷ the error at the network's output ŷ (for softmax cross-entropy, (softmax(ŷ) − onehot(y))/B):

    hidden block l, output h_l = f(a_l):   δa_l = (e B_l) ⊙ f′(a_l),   ΔW_l ∝ −δa_lᵀ h_{l−1}
    output block:                          its exact gradient (e back-propagated through the last block only)

with B_l ∈ R^{C × n_l} fixed and random. In block form, block l receives the signal ``e B_l`` at its output
and back-propagates it through itself only: its gradient is autograd's gradient of the local loss
``Σ ⟨sg(e B_l), h_l(sg(h_{l−1}))⟩`` (sg = stop-gradient), and the ``f′`` factor of the rule is that local
back-propagation through the block's activation. No gradient crosses a block boundary; the only global signal
is the output error, broadcast once.

What we checked (the rule as published and its block form, the error convention e = ∂L/∂ŷ for any loss): the
matrices are drawn once from the rule's seed and never change (buffers, not parameters); the output block gets
its true gradient. The distribution of B is not fixed by the papers we could read in full; we draw B_l like
the weights of an ``nn.Linear`` from the output to block l (uniform ±1/√C), or Gaussian with ``feedback=``.
All blocks' graphs are kept until the output error is known (one forward); memory is therefore close to
backprop's for the activations, unlike FF / Mono-Forward / NoProp.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_choice, check_positive
from ._local import LocalRule, as_blocks, block_widths

__all__ = ["FeedbackAlignment"]


class FeedbackAlignment(LocalRule):
    """Direct feedback alignment as a gradient source.

    The closure returns ``(x, y)``; ``loss(output, y)`` (default cross-entropy) defines the output error.
    Returns the loss. ``feedback[l]`` (buffers of the rule, in ``state_dict``) are the fixed matrices
    ``[C_out, n_l]`` of the hidden blocks l = 0 … L−2.

    Args:
        blocks: the network as an ``nn.Sequential`` (cut after each activation) or a list of modules, one per
            block; the last block produces the output ŷ.
        loss: ``loss(output, targets) -> scalar`` (default ``F.cross_entropy``).
        feedback: distribution of B: ``"uniform"`` (default, ±scale) or ``"gaussian"`` (std = scale).
        scale: its scale (default 1/√C_out, C_out = output features per example).
        example_input: one input batch, used only to infer widths when a block has no ``nn.Linear``.
        seed: seed of the feedback matrices.
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"`` (see :class:`LocalRule`).
    """

    paper = "Direct Feedback Alignment Provides Learning in Deep Neural Networks"

    def __init__(self, blocks: nn.Module | Sequence[nn.Module], *, loss: Callable[..., torch.Tensor] = F.cross_entropy,
                 feedback: str = "uniform", scale: float | None = None, example_input: torch.Tensor | None = None,
                 seed: int = 0, on_nonfinite: str = "raise"):
        if not callable(loss):
            raise ValueError(f"loss must be a callable (output, targets) -> scalar, got {type(loss).__name__}")
        blist = as_blocks(blocks)
        if len(blist) < 2:
            raise ValueError("FeedbackAlignment needs at least two blocks (hidden blocks and an output block)")
        feedback = check_choice("feedback", feedback, ("uniform", "gaussian"))
        widths = block_widths(blist, example_input)
        c_out = widths[-1]
        s = 1 / math.sqrt(c_out) if scale is None else check_positive("scale", scale)
        first = next(iter(blist.parameters()), None)
        dtype = first.dtype if first is not None else torch.get_default_dtype()
        gen = torch.Generator().manual_seed(int(seed))
        aux = nn.Module()
        for i, n in enumerate(widths[:-1]):
            if feedback == "uniform":
                b = (torch.rand(c_out, n, generator=gen, dtype=torch.float64) * 2 - 1) * s
            else:
                b = torch.randn(c_out, n, generator=gen, dtype=torch.float64) * s
            aux.register_buffer(f"B{i}", b.to(dtype=dtype, device=first.device if first is not None else "cpu"))
        super().__init__(blist, aux, seed=seed, on_nonfinite=on_nonfinite)
        self.loss_fn = loss
        self.widths = widths
        self.feedback_kind = feedback
        self.scale = s

    @property
    def feedback(self) -> list[torch.Tensor]:
        """The fixed matrices B_l ``[C_out, n_l]`` of the hidden blocks."""
        return [getattr(self.aux, f"B{i}") for i in range(len(self.blocks) - 1)]

    def output_error(self, output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, e = ∂loss/∂output), the output treated as a leaf."""
        leaf = output.detach().requires_grad_(True)
        loss = self.loss_fn(leaf, y)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss must return a scalar tensor")
        (e,) = torch.autograd.grad(loss, leaf)
        return loss.detach().reshape(()), e

    def signal(self, i: int, e: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The feedback reaching hidden block i's output: e B_i, shaped like the block's output."""
        return (e.reshape(e.shape[0], -1) @ self.feedback[i]).reshape(like.shape)

    def _local_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x
        outs = []
        for block in self.blocks:
            out = block(h.detach())
            outs.append(out)
            h = out
        loss, e = self.output_error(outs[-1], y)
        last = len(self.blocks) - 1
        self._grad(outs[-1], self._trainable(self.blocks[last]), f"block {last}", grad_output=e)
        for i in range(last):
            self._grad(outs[i], self._trainable(self.blocks[i]), f"block {i}",
                       grad_output=self.signal(i, e, outs[i]))
        return loss

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output ŷ (the blocks chained)."""
        for block in self.blocks:
            x = block(x)
        return x

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """argmax of the output over its last dimension."""
        return self.logits(x).argmax(-1)
