"""Learning-rate-free optimizers vs SGD over three decades of learning rates, on the digits MLP.

Claim checked (DoG paper): with no learning rate given, DoG lands "close to SGD with tuned learning rate". The
same budget is given to plain SGD (constant rate, no momentum, the setting DoG replaces) at five rates from
1e-3 to 1 and to DoG, L-DoG, DAdaptSGD, DAdaptAdam and Prodigy at their defaults (no rate). DoG and L-DoG are
also scored with the polynomial-decay average the authors recommend. Each method runs on the same seeds,
batches and initialisations; the score is test accuracy after the budget (mean over seeds). "Position" places
a method between the worst (0 %) and the best (100 %) SGD rate.
"""

from __future__ import annotations

from pathlib import Path

import torch

import gradkit as gk

from ...data import digits
from ...models import train_digits
from .._common import markdown_table, progress, pyplot

NAME = "lr_free"
CLAIM = ('"DoG is SGD\'s Best Friend: A Parameter-Free Dynamic Step Size Schedule": DoG, with no learning rate '
         'to tune, performs "close to SGD with tuned learning rate" (and D-Adaptation / Prodigy likewise set '
         "their own step size).")

SGD_RATES = [1e-3, 10 ** -2.25, 10 ** -1.5, 10 ** -0.75, 1.0]
LR_FREE = {
    "DoG": lambda ps: gk.optim.DoG(ps, kernel="foreach"),
    "LDoG": lambda ps: gk.optim.LDoG(ps, kernel="foreach"),
    "DAdaptSGD": lambda ps: gk.optim.DAdaptSGD(ps, kernel="foreach"),
    "DAdaptAdam": lambda ps: gk.optim.DAdaptAdam(ps, kernel="foreach"),
    "Prodigy": lambda ps: gk.optim.Prodigy(ps, kernel="foreach"),
}
AVERAGED = ("DoG", "LDoG")
STEPS = {"quick": 300, "full": 1500}


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


CHANCE = 0.1


def _run(make, steps: int, seed: int, data, average: bool) -> tuple[list[int], list[float], float | None, bool]:
    """(eval steps, test accuracies, accuracy of the averaged model, diverged)."""
    holder: dict = {}

    def make_opt(model):
        holder["avg"] = gk.optim.PolynomialDecayAverager(model) if average else None
        return make(model.parameters())

    def on_step(step: int) -> None:
        if holder["avg"] is not None:
            holder["avg"].step()

    try:
        res = train_digits(make_opt, steps, seed=seed, data=data, eval_every=max(1, steps // 20), on_step=on_step)
    except gk.NonFiniteError:
        # The loss overflowed (a step size too large for this problem): scored at chance level.
        return [], [CHANCE], CHANCE if average else None, True
    avg_acc = _accuracy(holder["avg"].averaged_model, data[2], data[3]) if average else None
    return res.eval.steps, res.eval.values, avg_acc, False


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def run(out: Path, quick: bool) -> str:
    """Run the experiment; returns its Markdown section (table and the PNG it wrote).

    Args:
        out: Output directory.
        quick: Smaller budgets (smoke run).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide MLP runs fastest on one thread (and is not slowed by a busy machine)
    try:
        return _run_all(out, quick)
    finally:
        torch.set_num_threads(threads)


def _run_all(out: Path, quick: bool) -> str:
    steps = STEPS["quick" if quick else "full"]
    seeds = [0] if quick else [0, 1, 2]
    data = digits(seed=0)
    jobs = [(f"SGD lr={lr:.3g}", lambda ps, lr=lr: torch.optim.SGD(ps, lr=lr), False) for lr in SGD_RATES]
    jobs += [(name, make, name in AVERAGED) for name, make in LR_FREE.items()]
    final: dict[str, list[float]] = {}
    diverged: dict[str, int] = {}
    averaged: dict[str, list[float]] = {}
    curves: dict[str, tuple[list[int], list[float]]] = {}
    with progress(len(jobs) * len(seeds), "lr_free") as bar:
        for label, make, average in jobs:
            for seed in seeds:
                steps_, accs, avg_acc, div = _run(make, steps, seed, data, average)
                final.setdefault(label, []).append(accs[-1])
                diverged[label] = diverged.get(label, 0) + int(div)
                if avg_acc is not None:
                    averaged.setdefault(label, []).append(avg_acc)
                if steps_ and label not in curves:
                    curves[label] = (steps_, accs)
                bar.advance(description=f"lr_free: {label} seed {seed}")
    sgd = {lr: _mean(final[f"SGD lr={lr:.3g}"]) for lr in SGD_RATES}
    best_lr = max(sgd, key=sgd.get)
    best, worst = sgd[best_lr], min(sgd.values())

    def position(acc: float) -> str:
        return f"{100 * (acc - worst) / (best - worst):.0f} %" if best > worst else "–"

    def per_seed(label: str) -> str:
        return ", ".join(f"{100 * a:.1f}" for a in final[label])

    def div_note(label: str) -> str:
        n = diverged.get(label, 0)
        return f" ({n}/{len(seeds)} diverged, scored at chance)" if n else ""

    rows = [[f"SGD, lr {lr:.3g}" + (" (best)" if lr == best_lr else "") + div_note(f"SGD lr={lr:.3g}"),
             f"{100 * sgd[lr]:.1f}", per_seed(f"SGD lr={lr:.3g}"), position(sgd[lr]), "–"] for lr in SGD_RATES]
    for name in LR_FREE:
        acc = _mean(final[name])
        rows.append([f"**{name}** (no lr){div_note(name)}", f"{100 * acc:.1f}", per_seed(name), position(acc),
                     f"{100 * (acc - best):+.1f}"])
        if name in averaged:
            acc = _mean(averaged[name])
            rows.append([f"**{name}** + polynomial-decay average (γ = 8)", f"{100 * acc:.1f}",
                         ", ".join(f"{100 * a:.1f}" for a in averaged[name]), position(acc),
                         f"{100 * (acc - best):+.1f}"])
    table = markdown_table(["method", "test accuracy % (mean)", "per seed", "position (worst SGD 0 %, best SGD 100 %)",
                            "vs best SGD (points)"], rows)
    png = out / "lr_free.png"
    plt = pyplot()
    if plt is not None:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.plot(SGD_RATES, [100 * sgd[lr] for lr in SGD_RATES], "o-", color="k", label="SGD (constant lr)")
        colors = dict(zip(LR_FREE, ("tab:blue", "tab:cyan", "tab:orange", "tab:red", "tab:green")))
        for name in LR_FREE:
            ax1.axhline(100 * _mean(final[name]), color=colors[name], ls="--", label=f"{name} (no lr)")
        ax1.set_xscale("log")
        ax1.set_xlabel("SGD learning rate")
        ax1.set_ylabel(f"test accuracy after {steps} steps (%)")
        ax1.set_title("digits MLP: LR-free methods vs an SGD sweep", fontsize=9)
        ax1.legend(fontsize=7)
        for label, (s, a) in curves.items():
            is_sgd = label.startswith("SGD")
            if is_sgd and label != f"SGD lr={best_lr:.3g}":
                continue
            ax2.plot(s, [100 * v for v in a], color="k" if is_sgd else colors[label],
                     label=f"{label} (best SGD)" if is_sgd else label)
        ax2.set_xlabel("step")
        ax2.set_ylabel("test accuracy (%)")
        ax2.set_title("learning curves (first seed that did not diverge)", fontsize=9)
        ax2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
    notes = (f"Digits MLP 64-64-10, batch 64, {steps} steps, seeds {seeds} (mean), test split of 449 images. "
             "SGD is plain constant-rate SGD (no momentum); every LR-free optimizer runs at its package defaults "
             "(lr = 1 multiplier, d0 = 1e-6 / reps_rel = 1e-6).")
    return f"{table}\n\n{notes}\n\n![LR-free methods vs SGD]({png.name})"
