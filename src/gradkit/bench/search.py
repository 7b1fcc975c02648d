"""``gradkit bench search``: our CMA-ES family on COCO's BBOB suite beside pycma, ask/tell overhead, an ESSA demo.

Three parts (``--part bbob,overhead,lora``):

* **bbob** — the 24 noiseless BBOB functions (COCO's ``cocoex``, the ``coco-experiment`` package) in the chosen
  dimensions and instances. Every solver (our ``CMAES`` and ``SepCMAES``, pycma's CMA-ES and its separable
  variant ``CMA_diagonal=True``) runs the same protocol with the same seeds: start uniform in [-4, 4]^d,
  σ0 = 2, IPOP restarts (population doubled, new uniform start) until the budget (``--budget`` × d
  evaluations) is spent or f − f_opt ≤ 1e-8. The result is COCO's empirical cumulative distribution
  (ECDF) of runtimes: the fraction of (function, instance, target) triples solved, for the 51 targets
  10^{2, 1.8, …, −8}, versus evaluations / d. f_opt is read from COCO's own optimum (``_best_parameter``);
  COCO's output folders are never written (no observer).
* **overhead** — wall time of one ``ask`` + ``tell`` generation (sphere fitness) at d = 10, 100, 1000, ours vs
  pycma. Only meaningful on a quiet machine.
* **lora** — ESSA-style adaptation: an MLP trained on digits meets a shifted task (horizontally flipped
  digits, or permuted pixels). A short supervised LoRA fine-tune on 100 shifted examples gives adapters
  B·A; they are SVD-factored and only their singular values are searched by ``CMAES``/``SepCMAES`` on the
  whole shifted training set (``gk.search.spaces.LoRASingularValues``), beside continuing to fine-tune the
  same adapters (A, B) with backprop (Adam) on the same data. Accuracy on the shifted test set vs
  forward-pass equivalents (one candidate = 1 forward; one backprop step = 3).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import gradkit as gk

from ._common import machine, markdown_table, out_dir, progress, pyplot, write

HELP = "CMA-ES family on COCO's BBOB (ECDF) vs pycma, ask/tell overhead, ESSA-style LoRA singular-value search"

TARGETS = 10.0 ** np.arange(2, -8.01, -0.2)  # COCO's 51 standard bbob targets on f − f_opt
SOLVERS = ("gradkit CMAES", "pycma CMA-ES", "gradkit SepCMAES", "pycma sep-CMA")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add this benchmark's options to its ``gradkit bench`` sub-command.

    Args:
        p: The sub-command's parser.
    """
    p.add_argument("--part", default="bbob,overhead,lora", help="comma-separated parts: bbob, overhead, lora")
    p.add_argument("--dims", default="2,5,10,20", help="BBOB dimensions")
    p.add_argument("--instances", default="1-3", help="BBOB instance indices, e.g. 1-3 or 1,2")
    p.add_argument("--functions", default="1-24", help="BBOB function indices")
    p.add_argument("--budget", type=float, default=1e3, help="BBOB evaluations per problem, times d (<= 1e4)")
    p.add_argument("--solvers", default=",".join(SOLVERS), help="comma-separated subset of: " + ", ".join(SOLVERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overhead-dims", default="10,100,1000")
    p.add_argument("--lora-shift", default="flip", choices=("flip", "permute"))
    p.add_argument("--lora-rank", type=int, default=8, help="adapter rank per layer in the LoRA demo")
    p.add_argument("--lora-budget", type=int, default=3000, help="evaluations per searcher in the LoRA demo")
    p.add_argument("--quick", action="store_true",
                   help="~1 min: dims 2,5, instance 1, budget 200·d, overhead at d = 10, 100; LoRA budget 1000")


# ---- BBOB ------------------------------------------------------------------------------------------------------
def _fopt(problem) -> float:
    """f_opt of a COCO problem: COCO writes the optimum to a file in the working directory; BBOB's f_opt are
    multiples of 0.01, so rounding f(x_opt) recovers it exactly."""
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            problem._best_parameter("print")
            xopt = np.loadtxt("._bbob_problem_best_parameter.txt", ndmin=1)
        finally:
            os.chdir(cwd)
    return round(float(problem(xopt)), 2)


def _ours(cls) -> Callable:
    def run_once(f, x0, sigma0, popsize, seed, max_evals, ftarget):
        es = cls(torch.as_tensor(x0), sigma0, popsize=popsize, seed=seed)
        while es.nfev + es.popsize <= max_evals and not es.stop():
            x = es.ask()
            es.tell(x, torch.as_tensor(f(x.numpy())))
            if es.best_f <= ftarget:
                break
        return es.nfev

    return run_once


def _pycma(diagonal: bool) -> Callable:
    def run_once(f, x0, sigma0, popsize, seed, max_evals, ftarget):
        import cma

        opts = {"popsize": popsize, "seed": seed + 1, "verbose": -9, "maxfevals": max_evals, "ftarget": ftarget,
                "CMA_diagonal": diagonal}
        es = cma.CMAEvolutionStrategy(x0, sigma0, opts)
        while not es.stop():
            x = es.ask()
            es.tell(x, list(f(np.asarray(x))))
        return es.countevals

    return run_once


RUNNERS: dict[str, Callable[[], Callable]] = {
    "gradkit CMAES": lambda: _ours(gk.search.CMAES),
    "gradkit SepCMAES": lambda: _ours(gk.search.SepCMAES),
    "pycma CMA-ES": lambda: _pycma(False),
    "pycma sep-CMA": lambda: _pycma(True),
}


def _solve(problem, run_once, budget: int, seed: int, fopt: float) -> list[tuple[int, float]]:
    """IPOP protocol shared by every solver; returns the improvements (evaluations, f − f_opt)."""
    d = problem.dimension
    trace: list[tuple[int, float]] = []
    state = {"n": 0, "best": math.inf}

    def f(xs: np.ndarray) -> np.ndarray:
        vals = np.array([problem(x) for x in xs], dtype=float)
        for v in vals:
            state["n"] += 1
            prec = v - fopt
            if prec < state["best"]:
                state["best"] = prec
                trace.append((state["n"], prec))
        return vals

    rng = np.random.default_rng([seed, problem.index])
    popsize = 4 + int(3 * math.log(d))
    while state["n"] < budget and state["best"] > 1e-8:
        x0 = rng.uniform(-4, 4, d)
        before = state["n"]
        run_once(f, x0, 2.0, popsize, int(rng.integers(2**31 - 1)), budget - state["n"], fopt + 1e-8)
        if state["n"] == before:  # the remaining budget is below one generation
            break
        popsize *= 2
    return [(n, p) for n, p in trace if n <= budget]


def _hit_times(trace: list[tuple[int, float]]) -> np.ndarray:
    """First evaluation count reaching each target (inf when never)."""
    out = np.full(len(TARGETS), np.inf)
    for n, p in trace:
        out[(TARGETS >= p) & np.isinf(out)] = n
    return out


def _parse_range(s: str) -> list[int]:
    vals: list[int] = []
    for part in s.split(","):
        if "-" in part:
            a, b = part.split("-")
            vals += list(range(int(a), int(b) + 1))
        elif part:
            vals.append(int(part))
    return vals


def run_bbob(args, out: Path) -> list[str]:
    """COCO BBOB: gradkit CMAES/SepCMAES beside pycma; returns the report's Markdown lines.

    Args:
        args: The parsed command line.
        out: Output directory (plots).
    """
    import cocoex

    dims, inst, funcs = _parse_range(args.dims), args.instances, _parse_range(args.functions)
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    unknown = set(solvers) - set(RUNNERS)
    if unknown:
        raise ValueError(f"--solvers: unknown {sorted(unknown)}; choose from {list(RUNNERS)}")
    suite = cocoex.Suite("bbob", "", f"dimensions: {','.join(map(str, dims))} instance_indices: {inst} "
                                     f"function_indices: {','.join(map(str, funcs))}")
    # cocoex frees a problem when the iteration moves on: use each one inside the loop only.
    hits: dict[str, dict[int, list[np.ndarray]]] = {s: {d: [] for d in dims} for s in solvers}
    per_func: dict[str, dict[tuple[int, int], list[np.ndarray]]] = {s: {} for s in solvers}
    seconds = dict.fromkeys(solvers, 0.0)
    with progress(len(suite) * len(solvers), "bbob") as bar:
        for problem in suite:
            d = problem.dimension
            fopt = _fopt(problem)
            budget = int(args.budget * d)
            for s in solvers:
                t0 = time.perf_counter()
                h = _hit_times(_solve(problem, RUNNERS[s](), budget, args.seed, fopt))
                seconds[s] += time.perf_counter() - t0
                hits[s][d].append(h)
                per_func[s].setdefault((problem.id_function, d), []).append(h)
                bar.advance(1, f"bbob {problem.id} {s}")
    # ECDF table: fraction of (function, instance, target) triples solved within budget fractions.
    fracs = [0.01, 0.1, 1.0]
    header = ["solver", "d", *[f"solved @ {f:g}·budget" for f in fracs], "f−f_opt ≤ 1e-8 (problems)", "wall s"]
    rows = []
    for d in dims:
        budget = args.budget * d
        for s in solvers:
            h = np.stack(hits[s][d])
            rows.append([s, d, *[float((h <= f * budget).mean()) for f in fracs],
                         f"{int(np.isfinite(h[:, -1]).sum())}/{len(h)}", ""])
    for s in solvers:
        rows.append([s, "all", *[float(np.concatenate([(np.stack(hits[s][d]) <= f * args.budget * d).ravel()
                                                       for d in dims]).mean()) for f in fracs],
                     f"{sum(int(np.isfinite(np.stack(hits[s][d])[:, -1]).sum()) for d in dims)}/"
                     f"{sum(len(hits[s][d]) for d in dims)}", round(seconds[s], 1)])
    lines = [f"BBOB: functions {args.functions}, dimensions {args.dims}, instances {inst}, budget "
             f"{args.budget:g}·d evaluations, IPOP restarts, 51 targets 10^[2..-8] on f − f_opt.", "",
             markdown_table(header, rows)]
    # Per-function fraction of targets reached at the full budget (all dims), ours vs pycma.
    fheader = ["f", *solvers]
    frows = []
    for fi in funcs:
        frows.append([f"f{fi}", *[float(np.mean([np.mean(np.stack(per_func[s][(fi, d)]) <= args.budget * d)
                                                 for d in dims if (fi, d) in per_func[s]])) for s in solvers]])
    lines += ["", "Fraction of targets reached at the full budget, per function (mean over dimensions and "
              "instances):", "", markdown_table(fheader, frows)]
    _plot_ecdf(hits, dims, args.budget, out / "search_bbob_ecdf.png")
    return lines


def _plot_ecdf(hits, dims, budget_mult, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    cols = len(dims) + 1
    fig, axes = plt.subplots(1, cols, figsize=(3.4 * cols, 3.2), sharey=True)
    grid = np.logspace(0, math.log10(budget_mult), 200)
    styles = {"gradkit CMAES": ("C0", "-"), "pycma CMA-ES": ("C1", "--"), "gradkit SepCMAES": ("C2", "-"),
              "pycma sep-CMA": ("C3", "--")}
    for ax, d in zip(axes, [*dims, "all"]):
        for s, per_dim in hits.items():
            if d == "all":
                h = np.concatenate([np.stack(per_dim[dd]).ravel() / dd for dd in dims])
            else:
                h = np.stack(per_dim[d]).ravel() / d
            c, ls = styles.get(s, (None, "-"))
            ax.plot(grid, [(h <= g).mean() for g in grid], color=c, ls=ls, label=s)
        ax.set_xscale("log")
        ax.set_title(f"d = {d}" if d != "all" else "all dimensions")
        ax.set_xlabel("evaluations / d")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of (f, instance, target) solved")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("BBOB 24 functions, 51 targets: runtime ECDF", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# ---- ask/tell overhead -----------------------------------------------------------------------------------------
def run_overhead(args, out: Path) -> list[str]:
    """Ask/tell overhead per generation beside pycma; returns the report's Markdown lines.

    Args:
        args: The parsed command line.
        out: Output directory.
    """
    import cma

    dims = _parse_range(args.overhead_dims)
    rows = []
    for d in dims:
        x0 = np.ones(d)
        makers = {
            "gradkit CMAES": lambda: gk.search.CMAES(torch.ones(d), 0.5, seed=0),
            "pycma CMA-ES": lambda: cma.CMAEvolutionStrategy(x0, 0.5, {"seed": 1, "verbose": -9}),
            "gradkit SepCMAES": lambda: gk.search.SepCMAES(torch.ones(d), 0.5, seed=0),
            "pycma sep-CMA": lambda: cma.CMAEvolutionStrategy(x0, 0.5, {"seed": 1, "verbose": -9,
                                                                        "CMA_diagonal": True}),
        }
        times = {}
        for name, make in makers.items():
            es = make()
            ours = name.startswith("gradkit")
            gens = 0
            # Mean over whole generations (not a median) so lazy eigendecompositions are paid for.
            t_end = time.perf_counter() + (1.0 if d <= 100 else 4.0)
            total = 0.0
            while gens < 10 or time.perf_counter() < t_end:
                t0 = time.perf_counter()
                x = es.ask()
                fx = gk.search.functions.sphere(x) if ours else list((np.asarray(x) ** 2).sum(1))
                es.tell(x, fx)
                total += time.perf_counter() - t0
                gens += 1
            times[name] = total / gens * 1e3
        popsize = 4 + int(3 * math.log(d))
        rows.append([d, popsize, *[times[n] for n in makers],
                     times["pycma CMA-ES"] / times["gradkit CMAES"],
                     times["pycma sep-CMA"] / times["gradkit SepCMAES"]])
    header = ["d", "λ", "gradkit CMAES ms/gen", "pycma ms/gen", "gradkit SepCMAES ms/gen", "pycma sep ms/gen",
              "speed-up CMAES", "speed-up sep"]
    return ["ask + tell wall time per generation (sphere fitness included), mean over whole generations "
            f"(torch {torch.get_num_threads()} threads):", "", markdown_table(header, rows)]


# ---- ESSA-style LoRA demo ----------------------------------------------------------------------------------------
def run_lora(args, out: Path) -> list[str]:
    """The ESSA-style LoRA singular-value search demo; returns the report's Markdown lines.

    Args:
        args: The parsed command line.
        out: Output directory (plots).
    """
    from ..data import digits
    from ..models import train_digits
    from ._search_lora import essa_demo

    xtr, ytr, xte, yte = digits(seed=0)
    pre = train_digits(lambda m: gk.optim.AdamW(m.parameters(), lr=3e-3, kernel="foreach"), steps=600, seed=0,
                       keep_model=True)
    res = essa_demo(pre.model, (xtr, ytr, xte, yte), shift=args.lora_shift, rank=args.lora_rank,
                    budget=args.lora_budget, seed=args.seed)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for name, curve in res["curves"].items():
            ax.plot([c[0] for c in curve], [c[1] for c in curve], label=name)
        ax.axhline(res["before"], color="gray", ls=":", label="pretrained model, shifted input")
        ax.axhline(res["sft"], color="k", ls=":", label=f"after SFT of rank-{res['rank']} LoRA (start)")
        ax.set_xscale("log")
        ax.set_xlabel("forward-pass equivalents on the shifted training set (log)")
        ax.set_ylabel("shifted test accuracy")
        ax.set_title(f"ESSA-style adaptation to {args.lora_shift}ped digits" if args.lora_shift == "flip"
                     else "ESSA-style adaptation to permuted-pixel digits", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "search_lora.png", dpi=110)
        plt.close(fig)
        print(f"wrote {out / 'search_lora.png'}")
    header = ["method", "searched numbers", "forward-pass equivalents", "shifted test accuracy"]
    rows = [["pretrained, no adaptation", 0, 0, res["before"]],
            [f"SFT: LoRA rank {res['rank']}, 100 examples (start)", res["n_lora"], res["sft_cost"], res["sft"]]]
    for name, (n, cost, acc) in res["final"].items():
        rows.append([name, n, cost, acc])
    return [f"Digits MLP (pretrained test accuracy {pre.final:.3f}) adapted to {args.lora_shift}ped digits; "
            f"{res['space_dim']} singular values searched (rank {res['rank']} × {res['layers']} layers).", "",
            markdown_table(header, rows)]


def run(args: argparse.Namespace) -> int:
    """Run the selected parts; print the report and write it under ``args.out``. Returns the exit code.

    Args:
        args: The parsed command line.
    """
    if args.quick:
        args.dims, args.instances, args.budget = "2,5", "1", min(args.budget, 200.0)
        args.overhead_dims, args.lora_budget = "10,100", min(args.lora_budget, 1000)
    if args.budget > 1e4:
        raise ValueError(f"--budget must be at most 1e4 (times d), got {args.budget}")
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    bad = set(parts) - {"bbob", "overhead", "lora"}
    if bad:
        raise ValueError(f"--part: unknown {sorted(bad)}; choose from bbob, overhead, lora")
    # ask/tell on small tensors: threads only add overhead. One thread for torch and for numpy's BLAS (pycma),
    # so both sides are measured alike.
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    out = out_dir(args.out)
    cmd = "gradkit bench search " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("part", args.part), ("dims", args.dims),
                                                     ("instances", args.instances), ("budget", f"{args.budget:g}")))
    report = [f"Machine: {machine()}.", f"Command: `{cmd}`.", ""]
    if "bbob" in parts:
        report += ["### BBOB ECDF", "", *run_bbob(args, out), "", "![BBOB ECDF](search_bbob_ecdf.png)", ""]
    if "lora" in parts:
        report += ["### ESSA-style LoRA singular-value search", "", *run_lora(args, out), "",
                   "![LoRA search](search_lora.png)", ""]
    if "overhead" in parts:
        report += ["### ask/tell overhead", "", *run_overhead(args, out), ""]
    write(out / "search.md", "\n".join(report))
    print("\n".join(report))
    return 0
