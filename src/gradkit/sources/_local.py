"""What the local learning rules share: how blocks are declared, the closure convention, per-block gradients.

A *local rule* trains each block of a network from an objective of its own. The gradient written for a block
is autograd's gradient of that block's local loss with the block's input detached, so no gradient ever crosses
a block boundary; a block's graph is freed as soon as its gradient is taken (peak activation memory is one
block's, not the network's).

Declaring blocks (:func:`as_blocks`):

* an ``nn.Sequential`` is cut into blocks after its parameter-free children (activations, dropout, flatten):
  ``Sequential(Linear, ReLU, Linear, ReLU, Linear)`` becomes ``[Linear, ReLU] [Linear, ReLU] [Linear]``;
* a list / tuple / ``nn.ModuleList`` of modules is taken as given, one module per block (wrap several layers in
  an ``nn.Sequential`` to make them one block).

The closure of a local rule returns the *batch* ``(inputs, targets)``, not a loss: each rule builds its own
losses. With :class:`gradkit.Pipeline`::

    rule = gk.sources.MonoForward(net, n_classes=10)
    pipe = gk.Pipeline(rule, optimizer=gk.optim.AdamW(rule.parameters(), lr=1e-3))
    for x, y in loader:
        pipe.step(lambda: (x, y))          # returns the sum of the blocks' local losses
    accuracy = (rule.predict(x_test) == y_test).float().mean()

Parameters a rule adds (Mono-Forward's projections, NoProp's class embedding and read-out) live in
``rule.module`` next to the blocks; ``rule.parameters()`` yields the blocks' and the rule's trainable
parameters, and ``rule.state_dict()`` holds the rule's own weights, its random stream and counters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._validate import check_int
from .base import Closure, Source

__all__ = ["LocalRule", "as_blocks", "block_width", "block_widths"]


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def as_blocks(blocks: nn.Module | Sequence[nn.Module]) -> nn.ModuleList:
    """The blocks of a network as an ``nn.ModuleList``.

    Args:
        blocks: an ``nn.Sequential``, cut into blocks after its parameter-free children (``Sequential(Linear,
            ReLU, Linear, ReLU, Linear)`` gives ``[Linear, ReLU] [Linear, ReLU] [Linear]``), or a list / tuple /
            ``nn.ModuleList`` of modules taken as given, one per block. The modules are the user's, not copies.
    """
    if isinstance(blocks, nn.Sequential):
        groups: list[list[nn.Module]] = []
        current: list[nn.Module] = []
        seen_params = seen_free_after = False
        for child in blocks.children():
            if _has_params(child) and seen_params and seen_free_after:
                groups.append(current)
                current, seen_free_after = [], False
            current.append(child)
            if _has_params(child):
                seen_params = True
            elif seen_params:
                seen_free_after = True
        if current:
            groups.append(current)
        out = nn.ModuleList(g[0] if len(g) == 1 else nn.Sequential(*g) for g in groups)
    elif isinstance(blocks, (list, tuple, nn.ModuleList)):
        out = nn.ModuleList(blocks)
    elif isinstance(blocks, nn.Module):
        raise ValueError("blocks must be an nn.Sequential or a list of modules (one per block); got a single "
                         f"{type(blocks).__name__}: wrap it as [module] to train it as one block")
    else:
        raise ValueError(f"blocks must be an nn.Sequential or a list of modules, got {type(blocks).__name__}")
    if len(out) == 0:
        raise ValueError("blocks must contain at least one module")
    for i, b in enumerate(out):
        if not isinstance(b, nn.Module):
            raise ValueError(f"blocks[{i}] must be an nn.Module, got {type(b).__name__}")
    return out


def block_width(block: nn.Module, example: torch.Tensor | None = None) -> int:
    """Features per example a block outputs: from a forward of ``example`` when given, else from its last
    ``nn.Linear`` (``out_features``)."""
    if example is not None:
        with torch.no_grad():
            return int(block(example).reshape(example.shape[0], -1).shape[1])
    last = None
    for m in block.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"cannot infer the output width of block {type(block).__name__} (no nn.Linear in it): "
                         "pass example_input=")
    return int(last.out_features)


def block_widths(blocks: Sequence[nn.Module], example: torch.Tensor | None = None) -> list[int]:
    """:func:`block_width` of every block, ``example`` carried through the blocks in order."""
    widths, h = [], example
    for b in blocks:
        widths.append(block_width(b, h))
        if h is not None:
            with torch.no_grad():
                h = b(h)
    return widths


def _batch(closure: Closure) -> tuple[torch.Tensor, torch.Tensor]:
    batch = closure()
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not all(isinstance(t, torch.Tensor) for t in batch):
        raise ValueError("the closure of a local learning rule must return the batch (inputs, targets) as two "
                         f"tensors, got {type(batch).__name__}")
    x, y = batch
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"inputs and targets must have the same batch size, got {x.shape[0]} and {y.shape[0]}")
    return x, y


class LocalRule(Source):
    """Base of the local learning rules: blocks, the rule's own parameters, per-block gradients, state.

    ``on_nonfinite`` (checked once per step over the summed loss and every gradient, as every source does):
    ``"raise"`` raises :class:`~gradkit.NonFiniteError` with ``.grad`` and the random stream as they were;
    ``"skip"`` writes no gradient (``.grad = None``), leaves the stream as it was, counts ``nonfinite_skips`` and
    returns a NaN loss; ``"ignore"`` checks nothing. ``"worst"`` (population stages only) raises ``ValueError``.

    Args:
        blocks: the network's blocks (see :func:`as_blocks`).
        aux: a module holding the rule's own parameters and buffers (projections, embeddings, feedback
            matrices); trained with the blocks and saved in :meth:`state_dict`.
        seed: seed of the rule's random stream (default 0).
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"``.

    Subclasses pass their extra modules as ``aux``; ``_local_step(x, y)`` runs the rule, calling :meth:`_grad`
    once per local loss, and returns the sum of the local losses. The gradients are collected first and written
    to ``.grad`` only when every local loss and gradient is finite, so a raised
    :class:`~gradkit.NonFiniteError` leaves ``.grad`` and the random stream as they were.
    """

    runs_backward = True  # gradients come from autograd (per block): gradient hooks fire
    self_guarded = True  # estimate runs under Source._guarded: a Pipeline need not snapshot it again

    def __init__(self, blocks: nn.Module | Sequence[nn.Module], aux: nn.Module | None = None, *, seed: int = 0,
                 on_nonfinite: str = "raise"):
        self.blocks = as_blocks(blocks)
        self.module = nn.Module()
        self.module.blocks = self.blocks
        self.module.aux = aux if aux is not None else nn.Module()
        self.aux = self.module.aux
        super().__init__(self.module, on_nonfinite=on_nonfinite)
        self.seed = check_int("seed", seed, 0)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.step_count = 0
        self._grads: dict[int, torch.Tensor] | None = None

    # -- what users call --------------------------------------------------------------------------------------
    def parameters(self) -> Iterator[torch.Tensor]:
        """The trainable parameters of the blocks and of the rule itself (pass them to the optimizer)."""
        return iter(self.params)

    def estimate(self, closure: Closure) -> torch.Tensor:
        x, y = _batch(closure)
        params = self.active_params()

        def compute() -> torch.Tensor:
            self._grads = {}
            try:
                with torch.enable_grad():
                    total = self._local_step(x, y)
                grads = self._grads
            finally:
                self._grads = None
            for p in params:
                p.grad = grads.get(id(p))
            self.step_count += 1
            return total.detach()

        return self._guarded(params, compute)

    # One estimate changes only the random stream and the counter (the rule's weights move in the optimizer).
    def snapshot(self) -> Any:
        return (self.step_count, self.generator.get_state())

    def restore(self, snapshot: Any) -> None:
        self.step_count, rng = snapshot
        self.generator.set_state(rng)

    # -- for subclasses ---------------------------------------------------------------------------------------
    def _local_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _trainable(*modules: nn.Module | None) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        seen: set[int] = set()
        for m in modules:
            if m is None:
                continue
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _grad(self, loss: torch.Tensor, params: Iterable[torch.Tensor], where: str,
              grad_output: torch.Tensor | None = None) -> None:
        """Add d(loss)/d(params) to the pending gradients (``grad_output`` for a vector-Jacobian product);
        the graph behind ``loss`` is freed. (Finiteness is checked once, at the end, by ``Source._guarded``.)"""
        params = list(params)
        if not params:
            return
        gs = torch.autograd.grad(loss, params, grad_outputs=grad_output, allow_unused=True)
        for p, g in zip(params, gs):
            if g is None:
                continue
            prev = self._grads.get(id(p))
            self._grads[id(p)] = g if prev is None else prev + g

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "nonfinite_skips": self.nonfinite_skips, "seed": self.seed,
                "rng": self.generator.get_state(),
                "aux": {k: v.detach().clone() for k, v in self.aux.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"step", "nonfinite_skips", "seed", "rng", "aux"} - set(state)
        if missing:
            raise ValueError(f"{type(self).__name__}.load_state_dict: missing keys {sorted(missing)}")
        self.aux.load_state_dict(state["aux"])
        self.step_count = int(state["step"])
        self.nonfinite_skips = int(state["nonfinite_skips"])
        self.seed = int(state["seed"])
        self.generator.set_state(state["rng"])
