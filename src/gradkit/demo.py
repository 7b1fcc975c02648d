"""``gradkit demo``: one digits MLP trained through the same :class:`gradkit.Pipeline` by several methods.

Every run is one line of :data:`RUNS`: a label, how to build the gradient source and the optimizer for a
model, and a step budget. The demo prints a table (final test accuracy, wall time, steps) and saves a PNG
of the training-loss curves.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import gradkit as gk

from ._report import markdown_table, out_dir, progress, pyplot
from .data import digits
from .models import mlp

__all__ = ["RUNS", "DemoRun", "add_arguments", "run"]


@dataclass(frozen=True)
class DemoRun:
    """One demo line: ``source(model)`` and ``optimizer(params, kernel)`` factories, and a step budget."""

    label: str
    source: Callable[[torch.nn.Module], gk.sources.Source]
    optimizer: Callable[..., torch.optim.Optimizer]
    steps: int
    quick_steps: int


def _backprop(model):
    return gk.sources.Backprop(model)


RUNS: list[DemoRun] = [
    DemoRun("backprop + AdamW", _backprop, lambda ps, k: gk.optim.AdamW(ps, lr=3e-3, kernel=k), 600, 150),
    DemoRun("backprop + Lion", _backprop, lambda ps, k: gk.optim.Lion(ps, lr=3e-4, weight_decay=0.1, kernel=k),
            600, 150),
    DemoRun("backprop + AdEMAMix", _backprop, lambda ps, k: gk.optim.AdEMAMix(ps, lr=3e-3, t_alpha_beta3=600,
                                                                                kernel=k), 600, 150),
    DemoRun("backprop + DiffGrad", _backprop, lambda ps, k: gk.optim.DiffGrad(ps, lr=3e-3, kernel=k), 600, 150),
    # No backprop: the same Pipeline and optimizer (AdamW, lr 3e-3) fed by estimated gradients. They need more
    # steps (and ES 16 forward passes per step) to get close; the budgets keep the whole demo under 2 minutes.
    DemoRun("no backprop: forward gradient (K=1)", lambda m: gk.sources.ForwardGradient(m, 1, seed=0),
            lambda ps, k: gk.optim.AdamW(ps, lr=3e-3, kernel=k), 8000, 1500),
    DemoRun("no backprop: zeroth-order SPSA (K=1)", lambda m: gk.sources.SPSA(m, eps=1e-3, n_directions=1, seed=0),
            lambda ps, k: gk.optim.AdamW(ps, lr=3e-3, kernel=k), 8000, 1500),
    DemoRun("no backprop: ES (population 16)", lambda m: gk.sources.ES(m, sigma=0.02, population=16, seed=0),
            lambda ps, k: gk.optim.AdamW(ps, lr=3e-3, kernel=k), 1000, 250),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="short budgets and the foreach kernel (under 30 s)")
    p.add_argument("--out", default="gradkit-demo", help="directory for the table and the loss-curve PNG")
    p.add_argument("--kernel", default=None, help="optimizer kernel (default: auto; foreach with --quick)")
    p.add_argument("--only", default=None, help="comma-separated substrings of run labels to keep")
    p.add_argument("--seed", type=int, default=0)


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_one(spec: DemoRun, steps: int, kernel: str, seed: int, data, bar=None, batch: int = 64):
    """Train a fresh MLP with ``spec``; returns (losses, test accuracy, seconds)."""
    xtr, ytr, xte, yte = data
    model = mlp((64, 64, 10), seed=seed)
    pipe = gk.Pipeline(spec.source(model), optimizer=spec.optimizer(model.parameters(), kernel))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (batch,), generator=gen)
        xb, yb = xtr[idx], ytr[idx]
        losses.append(float(pipe.step(lambda: F.cross_entropy(model(xb), yb))))
        if bar is not None:
            bar.advance()
    seconds = time.perf_counter() - start
    return losses, _accuracy(model, xte, yte), seconds


def run(args: argparse.Namespace) -> int:
    kernel = args.kernel or ("foreach" if args.quick else "auto")
    runs = [r for r in RUNS if not args.only or any(s.strip() in r.label for s in args.only.split(","))]
    if not runs:
        print(f"no demo run matches --only {args.only!r}; runs: {[r.label for r in RUNS]}")
        return 2
    data = digits(seed=args.seed)
    budgets = [r.quick_steps if args.quick else r.steps for r in runs]
    print(f"gradkit demo: a 64-64-10 MLP on scikit-learn's digits ({len(data[0])} train / {len(data[2])} test), "
          f"kernel={kernel}")
    results = []
    with progress(sum(budgets), "training") as bar:
        for spec, steps in zip(runs, budgets):
            bar.advance(0, description=spec.label)
            losses, acc, secs = train_one(spec, steps, kernel, args.seed, data, bar)
            results.append((spec.label, losses, acc, secs, steps))
    table = markdown_table(["method", "test accuracy", "wall time (s)", "steps"],
                           [(lab, f"{acc:.3f}", round(secs, 2), steps) for lab, _, acc, secs, steps in results])
    print(table)
    out = out_dir(args.out)
    (out / "demo.md").write_text(table + "\n")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        for lab, losses, *_ in results:
            k = max(1, len(losses) // 50)
            smooth = torch.tensor(losses).unfold(0, k, k).mean(1) if len(losses) >= k else torch.tensor(losses)
            ax.plot([(i + 1) * k for i in range(len(smooth))], smooth.tolist(), label=lab)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (cross-entropy)")
        ax.set_yscale("log")
        ax.set_title("gradkit demo: digits MLP, one Pipeline, several methods")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out) / "demo.png"
        fig.savefig(path, dpi=110)
        print(f"loss curves: {path}")
    return 0
