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

__all__ = ["GUIDED_LABEL", "RUNS", "DemoRun", "add_arguments", "guided_panel", "run"]


@dataclass(frozen=True)
class DemoRun:
    """One demo line: ``source(model)`` and ``optimizer(params, kernel)`` factories, and a step budget.

    Args:
        label: Row name in the table and legend.
        source: ``source(model) -> gk.sources.Source``.
        optimizer: ``optimizer(params, kernel) -> torch.optim.Optimizer``.
        steps: Step budget of the full demo.
        quick_steps: Step budget with ``--quick``.
    """

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
    """Add the demo's options to the ``gradkit demo`` command.

    Args:
        p: The command's parser.
    """
    p.add_argument("--quick", action="store_true", help="short budgets and the foreach kernel (under 30 s)")
    p.add_argument("--out", default="gradkit-demo", help="directory for the table and the loss-curve PNG")
    p.add_argument("--kernel", default=None, help="optimizer kernel (default: auto; foreach with --quick)")
    p.add_argument("--only", default=None, help="comma-separated substrings of run labels to keep")
    p.add_argument("--seed", type=int, default=0)


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_one(spec: DemoRun, steps: int, kernel: str, seed: int, data, bar=None, batch: int = 64):
    """Train a fresh MLP with ``spec``; returns (losses, test accuracy, seconds).

    Args:
        spec: The run.
        steps: Steps to train.
        kernel: The optimizer's ``kernel=``.
        seed: Seed of the model and the batches.
        data: ``(x_train, y_train, x_test, y_test)``.
        bar: A progress bar to advance each step (or None).
        batch: Batch size. Default 64.
    """
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
    """Run the demo: train every selected run, print the table, write ``demo.md`` and ``demo.png`` under ``args.out``.

    Args:
        args: The parsed command line.
    """
    kernel = args.kernel or ("foreach" if args.quick else "auto")
    runs = [r for r in RUNS if not args.only or any(s.strip() in r.label for s in args.only.split(","))]
    guided = not args.only or any(s.strip() in GUIDED_LABEL for s in args.only.split(","))
    if not runs:
        if guided:
            return guided_panel(args.out, quick=args.quick, seed=args.seed)
        print(f"no demo run matches --only {args.only!r}; runs: {[r.label for r in RUNS]} or {GUIDED_LABEL!r}")
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
    if guided:
        guided_panel(args.out, quick=args.quick, seed=args.seed)
    return 0


GUIDED_LABEL = "guided sampling"
# Flow training steps of the demo-sized test-bed, used when the benchmark's (6,000 steps) is not cached.
DEMO_FLOW_STEPS = 800


def guided_panel(out: str | Path, *, quick: bool = False, seed: int = 0, budget: str = "full") -> int:
    """The guided-sampling panel: the digits flow of :mod:`gradkit.guide.testbed` (trained once, cached) sampled
    plain, with CFG, and with CFG plus a black-box reward (ink, computed in NumPy) whose gradient SPSA estimates
    from reward values only. Prints a small table and saves ``guided.png`` in ``out``.

    Args:
        out: output directory.
        quick: 3 instead of 6 samples per class; skips the panel when the test-bed is not cached yet (without
            ``quick`` a demo-sized flow is trained then, about 20 s, and cached).
        seed: seed of the initial noise and of SPSA.
        budget: the test-bed budget (``"full"``; ``"tiny"`` for tests).
    """
    import functools

    import numpy as np

    from .guide import testbed

    if budget == "full" and not testbed.is_cached(budget):
        if quick:
            print(f"{GUIDED_LABEL}: skipped with --quick, the digits test-bed is not cached yet "
                  "(`gradkit demo --only guided` trains a demo-sized one in about 20 s)")
            return 0
        # The benchmark's flow takes minutes to train the first time: the demo trains the same network for
        # DEMO_FLOW_STEPS steps (cached too) and the benchmark's judge (seconds); the other parts are tiny.
        print(f"{GUIDED_LABEL}: the digits test-bed is not cached yet; training a demo-sized flow "
              f"({DEMO_FLOW_STEPS} of the benchmark's {testbed.FULL['flow'].steps} steps) and the judge, once")
        tb = testbed.load("tiny", flow=testbed.with_steps(testbed.FULL["flow"], DEMO_FLOW_STEPS),
                          judge=testbed.FULL["judge"])
    else:
        tb = testbed.load(budget)
    per = 3 if quick else 6
    labels = torch.arange(10).repeat_interleave(per)
    x0 = torch.randn(len(labels), 64, generator=torch.Generator().manual_seed(seed))

    def ink(x1: torch.Tensor) -> torch.Tensor:  # a black box: NumPy, no autograd graph
        return torch.from_numpy(np.clip(x1.detach().numpy(), -1.0, 1.0).mean(axis=1))

    spsa = functools.partial(gk.sources.SPSA, eps=1e-2, n_directions=8, seed=seed)
    runs = [("conditional", None), ("CFG w=2", gk.guide.CFG(2.0)),
            ("CFG w=2 + ink reward (SPSA, 8 directions)", gk.guide.MPGD(ink, 2.0, base=gk.guide.CFG(2.0),
                                                                        source=spsa))]
    rows, panels = [], []
    for label, guidance in runs:
        start = time.perf_counter()
        res = gk.guide.sample(tb.flow, x0.clone(), cond=labels, guidance=guidance, steps=32, seed=seed,
                              full_output=True)
        secs = time.perf_counter() - start
        acc = tb.evaluator(res.x, labels)["accuracy"]
        rows.append((label, f"{acc:.2f}", f"{float(ink(res.x).mean()):+.3f}", f"{res.nfe:g}", round(secs, 2)))
        panels.append((label, res.x))
    print(markdown_table(["guided sampling (digits flow, 32 Euler steps)", "judge accuracy", "ink", "NFE",
                          "time (s)"], rows))
    path = testbed.save_grid(Path(out_dir(out)) / "guided.png", panels, nrow=10)
    if path is not None:
        print(f"guided samples: {path}")
    return 0
