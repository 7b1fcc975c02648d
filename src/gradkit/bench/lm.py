"""``gradkit bench lm``: every optimizer on a real workload, a character-level transformer language model.

The model is :class:`gradkit.models.CharTransformer` (2 pre-norm blocks, d_model 64, 4 heads, context 64,
tied embedding, ~0.1 M parameters) trained on the text of Python's own documentation (``pydoc_data.topics``,
shipped with CPython, so no download) through ``gk.Pipeline``; see :func:`gradkit.models.train_char_lm`.
Everything is seeded: the same command gives the same losses on the same machine and thread count.

For each optimizer a short learning-rate sweep (``LR_GRID``, 3 rates; ``--lrs N`` keeps the first N) is run
for ``--steps`` steps each; the rate with the lowest final validation loss is reported. Reported per optimizer:
the best rate, validation loss (nats per character, 8 fixed batches of 32×64 characters) at five step counts, the mean
milliseconds per training step (source + transforms + optimizer, evaluation excluded), and the bytes of
tensors in the optimizer's state after training. Plots: validation loss vs steps and vs wall time.

Optimizers are discovered from ``gk.optim.__all__``, so ones added later are included with a default grid
(their default lr ×⅓, ×1 and ×3, or just their default when it is ≥ 0.5, as for parameter-free methods).
Optimizers whose class sets ``needs_graph`` (AdaHessian) get ``Backprop(create_graph=True)`` and PyTorch's
math attention kernel, because the fused CPU attention kernel has no double backward.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
from typing import Any

import torch

import gradkit as gk

from ..models import TaskResult, train_char_lm
from ._common import machine, markdown_table, out_dir, progress, pyplot, write
from .optimizers import our_optimizers

HELP = "character-level transformer LM on pydoc text: validation loss vs steps and wall time, per optimizer"

# Learning rates tried per optimizer (the best final validation loss is reported).
LR_GRID: dict[str, tuple[float, ...]] = {
    "AdamW": (1e-3, 3e-3, 1e-2),
    "Adam": (1e-3, 3e-3, 1e-2),
    "AdEMAMix": (1e-3, 3e-3, 1e-2),
    "DiffGrad": (1e-3, 3e-3, 1e-2),
    "Lion": (3e-4, 1e-3, 3e-3),
    "MARS": (3e-3, 1e-2, 1e-3),
    "Muon": (0.02, 0.05, 0.01),
    "Gravity": (3e-3, 1e-2, 3e-2),
    "FRUGAL": (1e-3, 3e-3, 1e-2),
    "AdaHessian": (0.05, 0.15, 0.3),
}

# Fixed extra arguments. Muon: embeddings (also the tied output head) and vectors go to its AdamW part,
# at AdamW's usual rate for this model.
OPT_KWARGS: dict[str, dict[str, Any]] = {
    "Muon": {"adamw_lr": 3e-3},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add this benchmark's options to its ``gradkit bench`` sub-command.

    Args:
        p: The sub-command's parser.
    """
    p.add_argument("--opt", default=None, help="comma-separated optimizer classes (default: all in gk.optim)")
    p.add_argument("--steps", type=int, default=500, help="training steps per run")
    p.add_argument("--lrs", type=int, default=None, help="use only the first N rates of each grid")
    p.add_argument("--kernel", default="foreach", help="kernel for gradkit optimizers (foreach, compiled, loop)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke run: 40 steps, one rate per optimizer")


def lr_grid(name: str) -> tuple[float | None, ...]:
    """Rates to try for optimizer ``name`` (``(None,)`` when it takes no ``lr``).

    Args:
        name: A gradkit optimizer class name.
    """
    if name in LR_GRID:
        return LR_GRID[name]
    param = inspect.signature(getattr(gk.optim, name)).parameters.get("lr")
    if param is None or not isinstance(param.default, (int, float)):
        return (None,)
    d = float(param.default)
    return (d,) if d >= 0.5 else (d / 3, d, 3 * d)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in the optimizer's per-parameter state.

    Args:
        opt: The optimizer.
    """
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def train_one(name: str, lr: float | None, steps: int, kernel: str, seed: int) -> tuple[TaskResult, int]:
    """One training run; returns the result and the optimizer-state bytes at the end.

    Args:
        name: A gradkit optimizer class name.
        lr: Learning rate (None: the optimizer's default).
        steps: Training steps.
        kernel: The optimizer's ``kernel=``.
        seed: Seed of the model and the batches.
    """
    cls = getattr(gk.optim, name)
    holder: list[torch.optim.Optimizer] = []

    def make(model):
        params = cls.param_groups(model) if name == "Muon" else model.parameters()
        kw = dict(OPT_KWARGS.get(name, {}), kernel=kernel)
        if lr is not None:
            kw["lr"] = lr
        opt = cls(params, **kw)
        holder.append(opt)
        return opt

    needs_graph = getattr(cls, "needs_graph", False)
    source = (lambda m: gk.sources.Backprop(m, create_graph=True)) if needs_graph else None
    ctx = contextlib.nullcontext()
    if needs_graph:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(SDPBackend.MATH)
    with ctx:
        res = train_char_lm(make, steps=steps, seed=seed, eval_every=max(1, steps // 5), source=source)
    return res, state_bytes(holder[0])


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print its tables and write them (and plots) under ``args.out``. Returns the exit code.

    Args:
        args: The parsed command line.
    """
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    steps = 40 if args.quick else args.steps
    n_lrs = 1 if args.quick else args.lrs
    names = [n.strip() for n in args.opt.split(",")] if args.opt else our_optimizers()
    for n in names:
        if not hasattr(gk.optim, n):
            raise ValueError(f"--opt: unknown optimizer {n!r}; available: {', '.join(our_optimizers())}")
    grids = {n: lr_grid(n)[:n_lrs] if n_lrs else lr_grid(n) for n in names}
    out = out_dir(args.out)
    runs: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    with progress(sum(len(g) for g in grids.values()), "LM benchmark") as bar:
        for name in names:
            for lr in grids[name]:
                bar.advance(0, description=f"{name} lr={lr}")
                try:
                    res, nbytes = train_one(name, lr, steps, args.kernel, args.seed)
                except Exception as exc:  # one optimizer failing must not stop the comparison
                    skipped[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
                    print(f"{name} lr={lr}: skipped ({skipped[name]})")
                    bar.advance()
                    continue
                final = res.final
                runs.setdefault(name, []).append(dict(
                    lr=lr, final=final if math.isfinite(final) else float("inf"), ms=1e3 * res.seconds / res.steps,
                    state_bytes=nbytes, steps=res.eval.steps, seconds=res.eval.seconds, val=res.eval.values))
                bar.advance()

    checkpoints = [max(1, round(steps * k / 5)) for k in range(1, 6)]
    rows, best = [], {}
    for name, rs in runs.items():
        b = min(rs, key=lambda r: r["final"])
        best[name] = b
        at = dict(zip(b["steps"], b["val"]))
        sweep = ", ".join(f"{r['lr']:g}: {r['final']:.3f}" for r in rs)
        rows.append((name, "–" if b["lr"] is None else f"{b['lr']:g}", *(at.get(s, float("nan")) for s in checkpoints),
                     round(b["ms"], 1), f"{b['state_bytes'] / 1024:.0f}", sweep))
    rows.sort(key=lambda r: best[r[0]]["final"])
    header = ["optimizer", "best lr", *(f"val@{s}" for s in checkpoints), "ms/step", "state KiB",
              "final val loss per lr"]
    table = markdown_table(header, rows)
    cmd = "gradkit bench lm" + (" --quick" if args.quick else f" --steps {steps}") + \
        (f" --opt {args.opt}" if args.opt else "") + (f" --lrs {args.lrs}" if args.lrs else "") + \
        (f" --threads {args.threads}" if args.threads else "")
    report = [f"Machine: {machine()}.", f"Command: `{cmd}`", "",
              "Validation loss in nats per character (lower is better) at the best rate of the sweep.", "", table]
    if skipped:
        report += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    print(table)
    write(out / "lm.md", "\n".join(report))
    (out / "lm.json").write_text(json.dumps(dict(command=cmd, machine=machine(), runs=runs, skipped=skipped),
                                            indent=1, default=str))
    _plot(best, out)
    return 0


def _plot(best: dict[str, dict[str, Any]], out) -> None:
    plt = pyplot()
    if plt is None or not best:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    cmap = plt.get_cmap("tab20")
    for i, (name, b) in enumerate(sorted(best.items(), key=lambda kv: kv[1]["final"])):
        label = name if b["lr"] is None else f"{name} (lr {b['lr']:g})"
        # 20 colours and 3 line styles keep up to 60 curves distinguishable.
        style = dict(color=cmap(i % 20), linestyle=("-", "--", ":")[i // 20 % 3], marker="o", ms=3, label=label)
        axes[0].plot(b["steps"], b["val"], **style)
        axes[1].plot(b["seconds"], b["val"], **style)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training wall time (s, evaluation excluded)")
    axes[0].set_ylabel("validation loss (nats/char)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("char-level transformer on pydoc text: each optimizer at its best learning rate")
    fig.tight_layout()
    fig.savefig(out / "lm.png", dpi=110)
    print(f"wrote {out / 'lm.png'}")
