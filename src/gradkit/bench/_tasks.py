"""Training tasks shared by benchmarks and literature experiments: the digits MLP and the character LM.

Both are deterministic given ``seed`` and run through :class:`gradkit.Pipeline`, so any source, transform,
optimizer or controller can be plugged in. They return curves (lists of ``(step, seconds, value)``) that
the benchmarks turn into tables and plots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import gradkit as gk

from ..data import CharCorpus, digits
from ..models import CharTransformer, mlp

__all__ = ["Curve", "TaskResult", "train_char_lm", "train_digits"]

OptFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


@dataclass
class Curve:
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, seconds: float, value: float) -> None:
        self.steps.append(step)
        self.seconds.append(seconds)
        self.values.append(value)

    def at(self, step: int) -> float:
        """Value recorded at the last evaluation at or before ``step``."""
        best = float("nan")
        for s, v in zip(self.steps, self.values):
            if s <= step:
                best = v
        return best


@dataclass
class TaskResult:
    train_loss: Curve
    eval: Curve  # test accuracy (digits) or validation loss in nats (LM)
    seconds: float
    steps: int
    model: torch.nn.Module | None = None

    @property
    def final(self) -> float:
        return self.eval.values[-1]


def _pipeline(model, optimizer, source=None, transforms=(), controllers=()):
    src = source(model) if source is not None else gk.sources.Backprop(model)
    return gk.Pipeline(src, transforms, optimizer, controllers)


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
    """Train an MLP on scikit-learn's digits; ``eval`` is test accuracy."""
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


_CORPUS: CharCorpus | None = None


def corpus() -> CharCorpus:
    global _CORPUS
    if _CORPUS is None:
        _CORPUS = CharCorpus.pydoc()
    return _CORPUS


def lm_val_loss(model: CharTransformer, batches: int = 8, batch: int = 32, seed: int = 1234) -> float:
    """Mean next-character cross-entropy (nats) on fixed validation windows."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(batches):
            x, y = corpus().batch("val", batch, model.block, gen)
            total += float(model.loss(x, y))
    return total / batches


def train_char_lm(make_opt: OptFactory, steps: int = 300, *, seed: int = 0, batch: int = 32, block: int = 64,
                  d_model: int = 64, n_layer: int = 2, n_head: int = 4, eval_every: int = 50, source=None,
                  transforms=(), controllers=(), model: CharTransformer | None = None,
                  on_step: Callable[[int], None] | None = None, keep_model: bool = False) -> TaskResult:
    """Train the character transformer on ``pydoc_data`` text; ``eval`` is validation loss in nats."""
    data = corpus()
    if model is None:
        model = CharTransformer(data.vocab_size, d_model=d_model, n_layer=n_layer, n_head=n_head, block=block,
                                seed=seed)

    def closure_for(gen):
        x, y = data.batch("train", batch, block, gen)
        return lambda: model.loss(x, y)

    return _train(model, make_opt, steps, seed, closure_for, lambda: lm_val_loss(model), eval_every, source,
                  transforms, controllers, on_step, keep_model)
