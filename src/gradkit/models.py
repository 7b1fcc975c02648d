"""Small reference models and the training tasks that use them, shared by the demo, benchmarks and tests.

* :func:`mlp`, :class:`CharTransformer`: seeded, CPU-sized models.
* :func:`train_digits`, :func:`train_char_lm`: deterministic training loops through :class:`gradkit.Pipeline`
  (any source, transform, optimizer or controller plugs in) returning curves as :class:`TaskResult`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import digits, pydoc_corpus

__all__ = ["CharTransformer", "Curve", "TaskResult", "lm_val_loss", "mlp", "train_char_lm", "train_digits"]


def mlp(sizes: tuple[int, ...] = (64, 64, 10), activation: type[nn.Module] = nn.ReLU, seed: int | None = None
        ) -> nn.Sequential:
    """A multi-layer perceptron; with ``seed`` its initialisation is reproducible and independent of global RNG.

    Args:
        sizes: Layer widths, input first and output last. Default ``(64, 64, 10)``.
        activation: Module class placed between linear layers. Default ``nn.ReLU``.
        seed: Seed of the initialisation (the global RNG is left untouched); None draws from the global RNG.
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return mlp(sizes, activation)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class _Block(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        shape = (b, t, self.n_head, c // self.n_head)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """A small GPT-style character language model (pre-norm blocks, learned positions, tied embedding).

    ``forward(ids) -> logits``; ``loss(ids, targets)`` is the mean next-character cross-entropy (nats).

    Args:
        vocab_size: Number of characters.
        d_model: Width of the residual stream. Default 64.
        n_layer: Number of transformer blocks. Default 2.
        n_head: Attention heads; must divide ``d_model``. Default 4.
        block: Longest context (learned positions). Default 64.
        seed: Seed of the initialisation (global RNG untouched); None draws from the global RNG.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layer: int = 2, n_head: int = 4, block: int = 64,
                 seed: int | None = None):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        gen_ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with gen_ctx:
            if seed is not None:
                torch.manual_seed(seed)
            self.block = block
            self.tok = nn.Embedding(vocab_size, d_model)
            self.pos = nn.Embedding(block, d_model)
            self.blocks = nn.ModuleList(_Block(d_model, n_head) for _ in range(n_layer))
            self.ln = nn.LayerNorm(d_model)
            for name, p in self.named_parameters():
                if name.endswith("weight") and p.dim() == 2:
                    nn.init.normal_(p, std=0.02 if "out" not in name else 0.02 / math.sqrt(2 * n_layer))
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x) @ self.tok.weight.T

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-character cross-entropy in nats.

        Args:
            ids: Input ids ``[batch, t]``.
            targets: Next-character ids ``[batch, t]``.
        """
        logits = self(ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


OptFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


@dataclass
class Curve:
    """A recorded curve: parallel lists of step, training seconds and value.

    Args:
        steps: Step numbers (1-based).
        seconds: Training wall time at each point (evaluation excluded).
        values: The recorded values.
    """

    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, seconds: float, value: float) -> None:
        """Append one point.

        Args:
            step: Step number.
            seconds: Training seconds so far.
            value: The value.
        """
        self.steps.append(step)
        self.seconds.append(seconds)
        self.values.append(value)

    def at(self, step: int) -> float:
        """Value recorded at the last evaluation at or before ``step`` (NaN before the first).

        Args:
            step: Step number.
        """
        best = float("nan")
        for s, v in zip(self.steps, self.values):
            if s <= step:
                best = v
        return best


@dataclass
class TaskResult:
    """What a training task returns.

    Args:
        train_loss: Training loss at every step.
        eval: Test accuracy (digits) or validation loss in nats (LM) at each evaluation.
        seconds: Training wall time (evaluation excluded).
        steps: Steps taken (fewer than asked when a controller stopped training).
        model: The trained model when ``keep_model=True``, else None.
    """

    train_loss: Curve
    eval: Curve  # test accuracy (digits) or validation loss in nats (LM)
    seconds: float
    steps: int
    model: torch.nn.Module | None = None

    @property
    def final(self) -> float:
        return self.eval.values[-1]


def _pipeline(model, optimizer, source=None, transforms=(), controllers=()):
    from .pipeline import Pipeline
    from .sources import Backprop

    src = source(model) if source is not None else Backprop(model)
    return Pipeline(src, transforms, optimizer, controllers)


def _eval_mode(opt, model, on: bool):
    """Schedule-free style optimizers evaluate at their averaged point: call their eval()/train() if present."""
    fn = getattr(opt, "eval" if on else "train", None)
    if callable(fn):
        fn()
    model.train(not on)


def _train(model: torch.nn.Module, make_opt: OptFactory, steps: int, seed: int,
           closure_for: Callable[[torch.Generator], Callable[[], torch.Tensor]], evaluate: Callable[[], float],
           eval_every: int, source, transforms, controllers, on_step, keep_model: bool) -> TaskResult:
    """The loop both tasks share: timed Pipeline steps, evaluation every ``eval_every`` steps and at the end."""
    opt = make_opt(model)
    pipe = _pipeline(model, opt, source, transforms, controllers)
    gen = torch.Generator().manual_seed(seed)
    train_curve, eval_curve = Curve(), Curve()
    elapsed = 0.0
    for step in range(1, steps + 1):
        closure = closure_for(gen)  # draws the batch before the clock starts
        t0 = time.perf_counter()
        loss = pipe.step(closure)
        elapsed += time.perf_counter() - t0
        train_curve.add(step, elapsed, float(loss))
        if step % eval_every == 0 or step == steps or pipe.should_stop:
            _eval_mode(opt, model, True)
            with torch.no_grad():
                eval_curve.add(step, elapsed, evaluate())
            _eval_mode(opt, model, False)
        if on_step is not None:
            on_step(step)
        if pipe.should_stop:
            break
    return TaskResult(train_curve, eval_curve, elapsed, step, model if keep_model else None)


def train_digits(make_opt: OptFactory, steps: int = 600, *, seed: int = 0, batch: int = 64,
                 hidden: Sequence[int] = (64,), eval_every: int = 50, source=None, transforms=(),
                 controllers=(), data=None, on_step: Callable[[int], None] | None = None,
                 keep_model: bool = False) -> TaskResult:
    """Train an MLP on scikit-learn's digits (:func:`gradkit.data.digits`); ``eval`` is test accuracy.

    Deterministic given ``seed`` (initialisation and batches).

    Args:
        make_opt: ``make_opt(model) -> optimizer``.
        steps: Number of steps. Default 600.
        seed: Seed of the initialisation and the batch order. Default 0.
        batch: Batch size. Default 64.
        hidden: Hidden widths of the MLP (input 64, output 10). Default ``(64,)``.
        eval_every: Evaluate every this many steps (and at the last). Default 50.
        source: ``source(model) -> gk.sources.Source``; None means backprop.
        transforms: Gradient transforms of the Pipeline.
        controllers: Controllers of the Pipeline (a stopping controller ends training early).
        data: ``(x_train, y_train, x_test, y_test)``; None means ``digits(seed=0)``.
        on_step: Called with the step number after every step.
        keep_model: Return the trained model in the result.
    """
    xtr, ytr, xte, yte = data if data is not None else digits(seed=0)
    model = mlp((64, *hidden, 10), seed=seed)

    def closure_for(gen):
        idx = torch.randint(0, len(xtr), (batch,), generator=gen)
        xb, yb = xtr[idx], ytr[idx]
        return lambda: F.cross_entropy(model(xb), yb)

    def accuracy():
        return float((model(xte).argmax(1) == yte).float().mean())

    return _train(model, make_opt, steps, seed, closure_for, accuracy, eval_every, source, transforms,
                  controllers, on_step, keep_model)


def lm_val_loss(model: CharTransformer, batches: int = 8, batch: int = 32, seed: int = 1234) -> float:
    """Mean next-character cross-entropy (nats) on fixed validation windows of :func:`gradkit.data.pydoc_corpus`.

    Args:
        model: The language model.
        batches: Number of batches. Default 8.
        batch: Windows per batch. Default 32.
        seed: Seed of the window positions (fixed, so every call sees the same windows). Default 1234.
    """
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(batches):
            x, y = pydoc_corpus().batch("val", batch, model.block, gen)
            total += float(model.loss(x, y))
    return total / batches


def train_char_lm(make_opt: OptFactory, steps: int = 300, *, seed: int = 0, batch: int = 32, block: int = 64,
                  d_model: int = 64, n_layer: int = 2, n_head: int = 4, eval_every: int = 50, source=None,
                  transforms=(), controllers=(), model: CharTransformer | None = None,
                  on_step: Callable[[int], None] | None = None, keep_model: bool = False) -> TaskResult:
    """Train :class:`CharTransformer` on ``pydoc_data`` text; ``eval`` is validation loss in nats.

    Args:
        make_opt: ``make_opt(model) -> optimizer``.
        steps: Number of steps. Default 300.
        seed: Seed of the initialisation and the batch order. Default 0.
        batch: Windows per batch. Default 32.
        block: Window length. Default 64.
        d_model: Width of the model. Default 64.
        n_layer: Number of blocks. Default 2.
        n_head: Attention heads. Default 4.
        eval_every: Evaluate every this many steps (and at the last). Default 50.
        source: ``source(model) -> gk.sources.Source``; None means backprop.
        transforms: Gradient transforms of the Pipeline.
        controllers: Controllers of the Pipeline.
        model: Train this model instead of a fresh one (fine-tuning).
        on_step: Called with the step number after every step.
        keep_model: Return the trained model in the result.
    """
    data = pydoc_corpus()
    if model is None:
        model = CharTransformer(data.vocab_size, d_model=d_model, n_layer=n_layer, n_head=n_head, block=block,
                                seed=seed)

    def closure_for(gen):
        x, y = data.batch("train", batch, block, gen)
        return lambda: model.loss(x, y)

    return _train(model, make_opt, steps, seed, closure_for, lambda: lm_val_loss(model), eval_every, source,
                  transforms, controllers, on_step, keep_model)
