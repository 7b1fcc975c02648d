"""Schedule-Free AdamW vs AdamW with a cosine schedule tuned for the full horizon, evaluated at any time.

Claim checked ("The Road Less Scheduled"): Schedule-Free needs no stopping time, yet matches a cosine schedule
tuned for the horizon at its end, and is better before it (the cosine run, still at a high rate, is not). Both
optimizers get the same linear warm-up (5 % of the horizon), no weight decay, and the best peak learning rate of
the same grid, chosen by the final score. Both are then read at 25 %, 50 % and 100 % of the horizon: the cosine
run is the one tuned for 100 % (its rate is still high at 25 %); Schedule-Free is evaluated at its averaged
point x (``opt.eval()``, which the training tasks call around every evaluation).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

import gradkit as gk

from ...data import digits
from ...models import train_char_lm, train_digits
from .._common import markdown_table, progress, pyplot

NAME = "schedule_free"
CLAIM = ('"The Road Less Scheduled": Schedule-Free AdamW, with no schedule and no stopping time, matches AdamW '
         "with a cosine schedule tuned for the horizon at the end and is better at any earlier time.")

FRACTIONS = (0.25, 0.5, 1.0)
HORIZON = {"digits": {"quick": 300, "full": 1200}, "char LM": {"quick": 80, "full": 600}}


def _cosine(opt: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _train(task: str, method: str, lr: float, steps: int, seed: int, data) -> tuple[list[int], list[float]]:
    warmup = max(1, steps // 20)
    holder: dict = {}

    def make_opt(model):
        if method == "sf":
            return gk.optim.ScheduleFreeAdamW(model.parameters(), lr=lr, warmup_steps=warmup, kernel="foreach")
        opt = gk.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, kernel="foreach")
        holder["sched"] = _cosine(opt, steps, warmup)
        return opt

    def on_step(step: int) -> None:
        if "sched" in holder:
            holder["sched"].step()

    if task == "digits":
        every = max(1, steps // 20)
        res = train_digits(make_opt, steps, seed=seed, data=data, eval_every=every, on_step=on_step)
    else:
        every = max(1, steps // 8)  # an evaluation costs as much as ~10 training steps here
        res = train_char_lm(make_opt, steps, seed=seed, eval_every=every, on_step=on_step)
    return res.eval.steps, res.eval.values


def run(out: Path, quick: bool) -> str:
    """Run the experiment; returns its Markdown section (table and the PNG it wrote).

    Args:
        out: Output directory.
        quick: Smaller budgets (smoke run).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these small models run fastest on one thread, and a busy machine slows them least
    try:
        return _run_all(out, quick)
    finally:
        torch.set_num_threads(threads)


def _run_all(out: Path, quick: bool) -> str:
    size = "quick" if quick else "full"
    tasks = {
        # task: (horizon, seeds, lr grid, higher is better, unit)
        "digits": (HORIZON["digits"][size], [0] if quick else [0, 1, 2],
                   [3e-3] if quick else [1e-3, 3e-3, 1e-2, 3e-2], True, "test accuracy %"),
        "char LM": (HORIZON["char LM"][size], [0], [3e-3] if quick else [3e-3, 1e-2, 2e-2], False,
                    "validation loss (nats/char)"),
    }
    data = digits(seed=0)
    n_jobs = sum(2 * len(seeds) * len(lrs) for _, seeds, lrs, _, _ in tasks.values())
    results: dict[tuple[str, str, float], list[tuple[list[int], list[float]]]] = {}
    with progress(n_jobs, "schedule_free") as bar:
        for task, (steps, seeds, lrs, _, _) in tasks.items():
            for method in ("cosine", "sf"):
                for lr in lrs:
                    for seed in seeds:
                        results.setdefault((task, method, lr), []).append(
                            _train("digits" if task == "digits" else "lm", method, lr, steps, seed, data))
                        bar.advance(description=f"schedule_free: {task} {method} lr {lr:g} seed {seed}")

    def at(task: str, method: str, lr: float, frac: float, steps: int) -> float:
        runs = results[(task, method, lr)]
        target = int(round(frac * steps))
        vals = []
        for s, v in runs:
            vals.append(next(val for st, val in zip(s, v) if st >= target))
        return sum(vals) / len(vals)

    rows, best = [], {}
    names = {"cosine": "AdamW + warm-up + cosine (tuned for 100 %)", "sf": "Schedule-Free AdamW (no schedule)"}
    for task, (steps, _seeds, lrs, higher, unit) in tasks.items():
        scale = 100.0 if task == "digits" else 1.0
        for method in ("cosine", "sf"):
            pick = max if higher else min
            lr = pick(lrs, key=lambda v, m=method, t=task, s=steps: at(t, m, v, 1.0, s))
            best[(task, method)] = lr
            rows.append([task, names[method], f"{lr:g}",
                         *(f"{scale * at(task, method, lr, f, steps):.{1 if task == 'digits' else 3}f}"
                           for f in FRACTIONS), unit])
    table = markdown_table(["task", "optimizer", "peak lr (best of grid)", "at 25 %", "at 50 %", "at 100 %",
                            "metric"], rows)
    png = out / "schedule_free.png"
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4))
        for ax, (task, (steps, seeds, _, higher, unit)) in zip(axes, tasks.items()):
            scale = 100.0 if task == "digits" else 1.0
            for method, color in (("cosine", "tab:gray"), ("sf", "tab:red")):
                lr = best[(task, method)]
                runs = results[(task, method, lr)]
                s = runs[0][0]
                v = [scale * sum(r[1][i] for r in runs) / len(runs) for i in range(len(s))]
                ax.plot(s, v, color=color, label=f"{names[method]}, lr {lr:g}")
            for f in FRACTIONS:
                ax.axvline(f * steps, color="k", lw=0.6, ls=":")
            ax.set_xlabel("step")
            ax.set_ylabel(unit)
            if not higher:
                ax.set_ylim(top=min(ax.get_ylim()[1], 3.5))
            ax.set_title(f"{task}: anytime quality ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
    d_steps, d_seeds, d_lrs = tasks["digits"][:3]
    l_steps, _, l_lrs = tasks["char LM"][:3]
    notes = (f"Digits: MLP 64-64-10, batch 64, horizon {d_steps} steps, seeds {d_seeds} (mean), lr grid {d_lrs}. "
             f"Char LM: 2-layer d=64 transformer on `pydoc_data.topics`, batch 32 × 64 characters, horizon {l_steps} "
             f"steps, seed 0, lr grid {l_lrs}. Warm-up 5 % for both, weight decay 0, betas (0.9, 0.999). "
             "The learning rate is chosen by the score at 100 % for each optimizer separately.")
    return f"{table}\n\n{notes}\n\n![Schedule-Free vs cosine]({png.name})"
