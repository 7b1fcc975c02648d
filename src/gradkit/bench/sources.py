"""``gradkit bench sources``: gradient sources side by side — accuracy per forward pass, memory, step time.

Three measurements, all through :class:`gradkit.Pipeline`:

1. **Accuracy vs forward passes and vs wall time** on the digits MLP (64-64-10, batch 64, one thread): every
   source runs until it has called the closure ``--budget`` times; test accuracy is recorded along the way.
   A "forward pass" is one closure evaluation: a backprop step counts 1 (plus its backward), a forward-gradient
   direction 1 (a forward-mode pass, costlier than a plain forward), SPSA ``2K``, ES ``population``,
   likelihood ratio ``n_samples``.
2. **Peak memory**, in a fresh process per method and model (``--skip-memory`` to omit), from the kernel's
   resident-set statistics (not the torch allocator), with glibc's default allocator settings: the process's
   peak resident set (``VmHWM``) over three steps — everything the process holds, including library code a
   method pages in (e.g. ``torch._dynamo``, ≈70 MiB, which every ``torch.optim`` optimizer imports) — and
   the part of it above the runtime, measured after the method took two steps on a tiny MLP and before the
   model is built: parameters, activations, gradients, restoration records, scratch and allocator
   fragmentation, i.e. the memory that comes with the model. Each ratio divides by the same quantity for
   three ``torch.no_grad`` forwards (inference). All methods use plain SGD (no optimizer state), as MeZO
   compares against. Two models: one whose activations dominate memory (MLP 64-512×4-10, batch 8192) and one
   whose parameters dominate (MLP 64-4096-4096-4096-10, 33.9 M parameters, batch 64: MeZO's regime).
3. **Step time relative to one inference forward** on both models (median of repeated steps).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import gradkit as gk

from ..models import train_digits
from ._common import (
    in_fresh_process,
    machine,
    markdown_table,
    median_time,
    out_dir,
    proc_status,
    progress,
    pyplot,
    write,
)

HELP = "gradient sources: accuracy per forward pass and per second (digits), peak memory and step time vs inference"


@dataclass(frozen=True)
class Method:
    """One benchmarked gradient source with its optimizer.

    Args:
        label: Row name.
        calls: Closure evaluations per step.
        source: ``source(model) -> gk.sources.Source``.
        optimizer: ``optimizer(model) -> torch.optim.Optimizer``; None when the source is its own optimizer (ZOSGD).
    """
    label: str
    calls: int  # closure evaluations per step
    source: Callable[[torch.nn.Module], gk.sources.Source]
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] | None  # None: the source is its optimizer


def _adamw(lr: float):
    return lambda m: gk.optim.AdamW(m.parameters(), lr=lr, kernel="foreach")


METHODS: list[Method] = [
    Method("Backprop + AdamW", 1, lambda m: gk.sources.Backprop(m), _adamw(3e-3)),
    Method("ForwardGradient (K=1) + AdamW", 1, lambda m: gk.sources.ForwardGradient(m, 1, seed=0), _adamw(3e-3)),
    Method("SPSA (K=1) + AdamW", 2, lambda m: gk.sources.SPSA(m, 1e-3, 1, seed=0), _adamw(3e-3)),
    Method("SPSA (K=8) + AdamW", 16, lambda m: gk.sources.SPSA(m, 1e-3, 8, seed=0), _adamw(3e-3)),
    Method("ZOSGD fused (K=1, lr 3e-3)", 2, lambda m: gk.sources.ZOSGD(m, lr=3e-3, eps=1e-3, seed=0), None),
    Method("ES (pop 16, ranks) + AdamW", 16, lambda m: gk.sources.ES(m, 0.02, 16, seed=0), _adamw(3e-3)),
    Method("LikelihoodRatio (n=8) + AdamW", 8, lambda m: gk.sources.LikelihoodRatio(m, 0.1, 8, seed=0),
           _adamw(1e-3)),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add this benchmark's options to its ``gradkit bench`` sub-command.

    Args:
        p: The sub-command's parser.
    """
    p.add_argument("--budget", type=int, default=16000, help="closure evaluations per source on digits")
    p.add_argument("--quick", action="store_true", help="budget 2000, small memory models, few timing repeats")
    p.add_argument("--only", default=None, help="comma-separated substrings of method labels")
    p.add_argument("--skip-memory", action="store_true", help="omit the memory subprocesses")
    p.add_argument("--skip-time", action="store_true", help="omit the step-time measurement")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per method (median reported)")


# -- 1. accuracy ---------------------------------------------------------------------------------------
def _train(method: Method, budget: int, bar) -> dict:
    steps = max(1, budget // method.calls)
    holder: dict[str, object] = {}

    def make_opt(model):
        if method.optimizer is None:
            holder["src"] = method.source(model)
            return holder["src"]
        return method.optimizer(model)

    def make_src(model):
        return holder["src"] if method.optimizer is None else method.source(model)

    r = train_digits(make_opt, steps, source=make_src, eval_every=max(1, steps // 20),
                     on_step=lambda s: bar.advance(method.calls))
    calls = [s * method.calls for s in r.eval.steps]
    return {"label": method.label, "calls": calls, "seconds": r.eval.seconds, "acc": r.eval.values,
            "per_call": method.calls, "total_seconds": r.seconds}


def _acc_at(res: dict, budget: int) -> float:
    best = float("nan")
    for c, a in zip(res["calls"], res["acc"]):
        if c <= budget:
            best = a
    return best


# -- 2. memory (one subprocess per method) -----------------------------------------------------------
def _memory_model(kind: str) -> tuple[tuple[int, ...], int]:
    """``(layer sizes, batch)`` of the activation-heavy or the parameter-heavy MLP (``-quick``: smaller)."""
    quick = kind.endswith("-quick")
    if kind.split("-")[0] == "activations":
        width, batch = (256, 4096) if quick else (512, 8192)
        return (64,) + (width,) * 4 + (10,), batch
    width = 1024 if quick else 4096
    return (64,) + (width,) * 3 + (10,), 64


MEMORY_METHODS = ("inference", "backprop", "spsa", "zosgd", "zosgd_inexact", "forward_gradient")


def _memory_step(method: str, model: torch.nn.Module, closure: Callable[[], torch.Tensor]) -> Callable[[], None]:
    if method == "inference":
        def infer() -> None:
            with torch.no_grad():
                closure()
        return infer
    if method.startswith("zosgd"):
        zo = gk.sources.ZOSGD(model, lr=1e-4, seed=0, exact_restore=method == "zosgd")
        pipe = gk.Pipeline(zo, optimizer=zo)
    else:
        src = {"backprop": lambda: gk.sources.Backprop(model),
               "spsa": lambda: gk.sources.SPSA(model, 1e-3, 1, seed=0),
               "forward_gradient": lambda: gk.sources.ForwardGradient(model, 1, seed=0)}[method]()
        pipe = gk.Pipeline(src, optimizer=torch.optim.SGD(model.parameters(), lr=1e-4))
    return lambda: pipe.step(closure)


def _warm_up(method: str, sizes: tuple[int, ...], x: torch.Tensor, y: torch.Tensor) -> None:
    from ..models import mlp

    tiny = mlp((sizes[0], 16, sizes[-1]), seed=0)
    step = _memory_step(method, tiny, lambda: F.cross_entropy(tiny(x), y))
    step()
    step()


def memory_child(method: str, kind: str, steps: int = 3) -> dict:
    """Run in a fresh process: the peak resident set over ``steps`` steps of ``method``, and the runtime's.

    Before the runtime is measured, the method takes two steps on a tiny MLP, so the library code and one-off
    state it needs (e.g. ``torch._dynamo``, imported by every ``torch.optim`` optimizer) are already resident:
    "above the runtime" is then the memory that comes with the model.

    Args:
        method: One of :data:`MEMORY_METHODS`.
        kind: Which model shape (activation- or parameter-heavy).
        steps: Steps measured. Default 3.
    """
    from ..models import mlp

    torch.set_num_threads(1)
    sizes, batch = _memory_model(kind)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, sizes[0], generator=gen), torch.randint(0, sizes[-1], (batch,), generator=gen)
    _warm_up(method, sizes, x[:4].clone(), y[:4].clone())
    gc.collect()
    runtime = proc_status("VmRSS")  # interpreter, torch, gradkit, the method's code paths, the batch
    model = mlp(sizes, seed=0)
    step = _memory_step(method, model, lambda: F.cross_entropy(model(x), y))
    for _ in range(steps):
        step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"method": method, "kind": kind, "runtime": runtime, "peak": proc_status("VmHWM"),
            "rest": proc_status("VmRSS"), "param_bytes": params}


MEMORY_LABELS = {
    "inference": "inference (no_grad forward)",
    "backprop": "Backprop + SGD",
    "spsa": "SPSA general mode (K=1) + SGD",
    "zosgd": "ZOSGD fused (K=1), exact_restore=True",
    "zosgd_inexact": "ZOSGD fused (K=1), exact_restore=False",
    "forward_gradient": "ForwardGradient (K=1) + SGD",
}


def _memory(kind: str, pinned: bool = False) -> dict[str, dict]:
    """Every method's :func:`memory_child` in a fresh process.

    ``pinned=False``: glibc's default allocator settings, as users run. ``pinned=True``: every block of 64 KiB or
    more is mmapped and returned at once (``MALLOC_MMAP_THRESHOLD_=65536``), so the resident set follows the
    live memory closely instead of the allocator's retained heap.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(var, None)
    if pinned:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    return {m: in_fresh_process("gradkit.bench.sources", "memory_child", m, kind, env=env) for m in MEMORY_METHODS}


def memory_rows(mem: dict[str, dict]) -> list[tuple]:
    """Table rows: peak RSS and its ratio to inference, and the same above the runtime."""
    inf = mem["inference"]
    rows = []
    for name, v in mem.items():
        above, inf_above = v["peak"] - v["runtime"], inf["peak"] - inf["runtime"]
        rows.append((MEMORY_LABELS[name], round(v["peak"] / 2**20, 1), round(v["peak"] / inf["peak"], 3),
                     round(above / 2**20, 1), round(above / inf_above, 3)))
    return rows


# -- 3. step time ------------------------------------------------------------------------------------
def _step_times(kind: str, repeats: int) -> list[tuple[str, int, float, float]]:
    """Median step time of each source and its ratio to one ``no_grad`` forward, on one of the two models.

    On the parameter-heavy model only the sources of the memory table run (ES and the likelihood ratio are
    population methods for small models), with ``exact_restore`` both ways for ZOSGD.
    """
    from ..models import mlp

    sizes, batch = _memory_model(kind)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, sizes[0], generator=gen), torch.randint(0, sizes[-1], (batch,), generator=gen)
    model = mlp(sizes, seed=0)

    def closure():
        return F.cross_entropy(model(x), y)

    def forward():
        with torch.no_grad():
            closure()

    sgd = lambda: torch.optim.SGD(model.parameters(), lr=1e-5)  # noqa: E731
    zo = gk.sources.ZOSGD(model, lr=1e-5, seed=0)
    pipes = {
        "Backprop": (1, lambda: gk.Pipeline(gk.sources.Backprop(model), optimizer=sgd())),
        "ForwardGradient (K=1)": (1, lambda: gk.Pipeline(gk.sources.ForwardGradient(model, 1, seed=0),
                                                         optimizer=sgd())),
        "SPSA (K=1), general mode": (2, lambda: gk.Pipeline(gk.sources.SPSA(model, 1e-3, 1, seed=0),
                                                            optimizer=sgd())),
        "ZOSGD fused (K=1)": (2, lambda: gk.Pipeline(zo, optimizer=zo)),
        "ES (population 8)": (8, lambda: gk.Pipeline(gk.sources.ES(model, 0.01, 8, seed=0), optimizer=sgd())),
        "LikelihoodRatio (n=2)": (2, lambda: gk.Pipeline(gk.sources.LikelihoodRatio(model, 0.01, 2, seed=0),
                                                         optimizer=sgd())),
    }
    if kind.startswith("parameters"):
        for label in ("ES (population 8)", "LikelihoodRatio (n=2)"):
            del pipes[label]
        inexact = gk.sources.ZOSGD(model, lr=1e-5, seed=0, exact_restore=False)
        pipes["ZOSGD fused (K=1), exact_restore=False"] = (2, lambda: gk.Pipeline(inexact, optimizer=inexact))
    t_fwd = median_time(forward, warmup=2, repeats=repeats)
    rows = [("one forward (no_grad)", 1, t_fwd * 1e3, 1.0)]
    for label, (calls, make) in pipes.items():
        pipe = make()
        t = median_time(lambda pipe=pipe: pipe.step(closure), warmup=2, repeats=repeats)
        rows.append((label, calls, t * 1e3, t / t_fwd))
    return rows


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print its tables and write them (and plots) under ``args.out``. Returns the exit code.

    Args:
        args: The parsed command line.
    """
    budget = 2000 if args.quick else args.budget
    methods = [m for m in METHODS if not args.only or any(s.strip() in m.label for s in args.only.split(","))]
    out = out_dir(args.out)
    cmd = f"gradkit bench sources{' --quick' if args.quick else f' --budget {budget}'}"
    report = [f"Machine: {machine()}.", f"Command: `{cmd}`", ""]

    results = []
    # One intra-op thread for the tiny digits MLP: more threads only add synchronisation (and, on a busy
    # machine, spinning) to microsecond-sized kernels.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with progress(budget * len(methods), "digits") as bar:
            for m in methods:
                bar.advance(0, description=m.label)
                results.append(_train(m, budget, bar))
    finally:
        torch.set_num_threads(threads)
    marks = [budget // 16, budget // 4, budget]
    header = ["source", "evals/step"] + [f"acc @ {b} evals" for b in marks] + ["wall time (s)"]
    rows = [(r["label"], r["per_call"], *[_acc_at(r, b) for b in marks], r["total_seconds"]) for r in results]
    table = markdown_table(header, rows)
    report += ["### Test accuracy on digits vs closure evaluations (forward passes)", "", table, ""]
    (out / "accuracy.json").write_text(json.dumps(results))

    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in results:
            axes[0].plot(r["calls"], r["acc"], label=r["label"])
            axes[1].plot(r["seconds"], r["acc"], label=r["label"])
        axes[0].set_xlabel("closure evaluations (forward passes)")
        axes[1].set_xlabel("training wall time (s)")
        for ax in axes:
            ax.set_ylabel("test accuracy")
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.suptitle("gradkit bench sources: digits MLP, one Pipeline per gradient source")
        fig.tight_layout()
        fig.savefig(out / "sources_accuracy.png", dpi=110)
        report += ["![accuracy vs evaluations and time](sources_accuracy.png)", ""]

    if not args.skip_memory:
        for kind in ("activations", "parameters"):
            k = kind + ("-quick" if args.quick else "")
            sizes, batch = _memory_model(k)
            for pinned in (False, True):
                mem = _memory(k, pinned=pinned)
                inf = mem["inference"]
                alloc = ("glibc's mmap threshold pinned at 64 KiB: the resident set follows live memory" if pinned
                         else "glibc's default allocator settings")
                report += [f"### Peak memory, {kind} dominate (MLP {'-'.join(map(str, sizes))}, batch {batch}: "
                           f"parameters {inf['param_bytes'] / 2**20:.1f} MiB, one layer's activations "
                           f"{batch * sizes[1] * 4 / 2**20:.1f} MiB; {alloc})", "",
                           markdown_table(["method", "peak RSS (MiB)", "ratio to inference",
                                           "peak above the runtime (MiB)", "ratio to inference"], memory_rows(mem)),
                           ""]
                (out / f"memory_{kind}{'_pinned' if pinned else ''}.json").write_text(json.dumps(mem))

    if not args.skip_time:
        for kind, repeats in (("activations", args.repeats), ("parameters", max(3, args.repeats // 3))):
            k = kind + ("-quick" if args.quick else "")
            sizes, batch = _memory_model(k)
            trows = _step_times(k, 3 if args.quick else repeats)
            report += [f"### Step time relative to one inference forward ({kind} dominate: MLP "
                       f"{'-'.join(map(str, sizes))}, batch {batch}, SGD)", "",
                       markdown_table(["step", "closure evals", "ms (median)", "ratio to one forward"], trows), ""]

    text = "\n".join(report)
    print(text)
    write(out / "sources.md", text)
    return 0
