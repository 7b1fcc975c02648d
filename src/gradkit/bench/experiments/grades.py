"""GradES at small scale: wall-clock time and final quality with and without per-matrix gradient freezing.

Paper (Wen et al. 2025): fine-tuning LLMs, GradES "speeds up training time by 1.57–7.22×" at equal or better
accuracy, against a fixed-budget baseline. Here: (1) the digits MLP (64-128-64-10) trained for a fixed budget with
AdamW, against GradES at three thresholds τ on the L1 norm of each weight matrix's gradient (EMA-smoothed,
patience 10 steps, warm-up 100); several seeds. (2) Full runs only: continued training ("fine-tuning") of the
character LM from a short pre-training, with and without GradES, one seed. Time is the optimizer-step time
measured by the shared tasks (evaluation excluded).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import gradkit as gk

from ...models import TaskResult, train_char_lm, train_digits
from .._common import markdown_table, progress, pyplot

NAME = "grades"
CLAIM = ('"GradES: Significantly Faster Training in Transformers with Gradient-Based Early Stopping": freezing '
         "each weight matrix once its gradient magnitude falls below τ speeds up training 1.57–7.22× at equal "
         "or better accuracy.")

# Calibrated for digits pixels in [-1, 1] (gradkit.data.digits): from 'stops at a third of the budget' down to
# 'barely stops'.
TAUS = (3.0, 1.0, 0.3)
PATIENCE = 10
SMOOTHING = 0.9
# The L1 norm grows with the matrix size: the LM's matrices hold 4k-16k elements against the MLP's 0.6k-8k.
LM_TAU = 12.0
WARMUP = 100


def _digits(seed: int, tau: float | None, steps: int) -> tuple[TaskResult, gk.control.GradES | None]:
    ctrl: list = []

    def make_opt(model):
        opt = gk.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0, kernel="foreach")
        if tau is not None:
            # The controller needs the model, which the task builds: create it here, before the Pipeline.
            ctrl.append(gk.control.GradES(model, tau=tau, patience=PATIENCE, warmup_steps=WARMUP,
                                          smoothing=SMOOTHING, optimizer=opt))
        return opt

    res = train_digits(make_opt, steps=steps, seed=seed, hidden=(128, 64), eval_every=25, controllers=ctrl)
    return res, (ctrl[0] if ctrl else None)


def _lm(quick: bool) -> tuple[list[list], dict]:
    pre = train_char_lm(lambda m: gk.optim.AdamW(m.parameters(), lr=3e-3, kernel="foreach"), steps=300, seed=0,
                        keep_model=True, eval_every=300)
    import copy

    out: dict = {}
    rows = []
    for tau in (None, LM_TAU):
        model = copy.deepcopy(pre.model)
        ctrl = [] if tau is None else [gk.control.GradES(model, tau=tau, patience=PATIENCE, warmup_steps=WARMUP,
                                                         smoothing=SMOOTHING)]
        res = train_char_lm(lambda m: gk.optim.AdamW(m.parameters(), lr=1e-3, kernel="foreach"), steps=600,
                            seed=1, model=model, controllers=ctrl, eval_every=50)
        out[tau] = res
        frozen = f"{ctrl[0].frozen_fraction:.0%} ({len(ctrl[0].frozen)}/{len(ctrl[0].named)})" if ctrl else "–"
        rows.append(["baseline" if tau is None else f"GradES τ={tau:g}", res.steps, f"{res.seconds:.1f}",
                     f"{res.final:.3f}", frozen])
    return rows, out


def run(out: Path, quick: bool) -> str:
    """Run the experiment; returns its Markdown section (table and the PNG it wrote).

    Args:
        out: Output directory.
        quick: Smaller budgets (smoke run).
    """
    seeds = [0, 1] if quick else [0, 1, 2]
    steps = 1000 if quick else 2000
    runs: dict[float | None, list[tuple[TaskResult, gk.control.GradES | None]]] = {}
    with progress(len(seeds) * (1 + len(TAUS)), "grades digits") as bar:
        for tau in (None, *TAUS):
            runs[tau] = []
            for seed in seeds:
                runs[tau].append(_digits(seed, tau, steps))
                bar.advance(description=f"grades: τ={tau} seed {seed}")
    base_time = statistics.mean(r.seconds for r, _ in runs[None])
    base_acc = statistics.mean(r.final for r, _ in runs[None])
    rows = [["baseline (fixed budget)", f"{steps}", "1.00×", f"{base_time:.2f}", "1.00×",
             f"{100 * base_acc:.2f} %", "–"]]
    for tau in TAUS:
        rs = runs[tau]
        t = statistics.mean(r.seconds for r, _ in rs)
        acc = statistics.mean(r.final for r, _ in rs)
        stop = ", ".join(str(r.steps) for r, _ in rs)
        frozen = statistics.mean(c.frozen_fraction for _, c in rs)
        fewer = steps / statistics.mean(r.steps for r, _ in rs)
        rows.append([f"GradES τ={tau:g}", stop, f"{fewer:.2f}×", f"{t:.2f}", f"{base_time / t:.2f}×",
                     f"{100 * acc:.2f} %", f"{frozen:.0%}"])
    table = markdown_table(["run", "steps (per seed)", "budget ÷ steps", "train time s (mean)", "speed-up (time)",
                            "test accuracy (mean)", "frozen at end"], rows)
    plt = pyplot()
    png = out / "grades.png"
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        colors = {None: "tab:gray", TAUS[0]: "tab:red", TAUS[1]: "tab:orange", TAUS[2]: "tab:green"}
        for tau, rs in runs.items():
            for i, (r, _) in enumerate(rs):
                ax.plot(r.eval.seconds, r.eval.values, color=colors[tau], alpha=0.8,
                        label=("baseline" if tau is None else f"GradES τ={tau:g}") if i == 0 else None)
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.9, 1.0)
        ax.set_title("digits MLP: GradES vs fixed budget", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
    text = (f"**Digits MLP**, AdamW lr 2e-3, batch 64, budget {steps} steps, seeds {seeds}; GradES statistic: the "
            f"paper's element-wise L1 norm of each weight matrix's gradient, smoothed by an EMA (β = {SMOOTHING}), "
            f"patience {PATIENCE}, warm-up {WARMUP}; training stops when every matrix is frozen.\n\n{table}")
    if not quick:
        lm_rows, _ = _lm(quick)
        lm_table = markdown_table(["char LM, 600 fine-tuning steps", "steps", "train time s", "val loss (nats)",
                                   "frozen at end"], lm_rows)
        text += ("\n\n**Character LM** (2 layers, d 64), pre-trained 300 steps, then 600 steps of AdamW lr 1e-3 "
                 f"with and without GradES (same settings, τ = {LM_TAU:g}); one seed. "
                 f"\n\n{lm_table}")
    return text + f"\n\n![GradES accuracy against time]({png.name})"
