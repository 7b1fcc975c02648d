"""``gradkit bench optimizers``: step time of every optimizer and kernel, side by side with torch and the references.

For each size, parameters are 40 equal float32 tensors (10.5 M parameters = 40 × 512 × 512) with fixed random
gradients. Each optimizer is measured in the same process beside torch's fused and foreach AdamW and — when
installed — the reference package implementing the same algorithm; every timed step of a row is followed by a
step of torch's fused AdamW (its own parameters), and the ratios below are medians over those pairs, so they
compare steps taken under the same machine load (they hold on a busy machine where absolute times do not).
Reported per row:

* ms/step (median), and compile time for ``kernel="compiled"`` (paid once per rule and dtype, whatever the
  layout, plus the wide graph's background compile for 32+ tensors; 0 when an earlier row or inductor's disk
  cache already compiled it);
* bytes moved per step: each step must read the gradient and read+write the parameter and every
  parameter-shaped state buffer, ``(3 + 2·k)·4`` bytes per parameter for ``k`` buffers — the memory-traffic
  floor of the algorithm;
* effective GB/s = bytes moved / time;
* ``vs fused AdamW /byte``: median over pairs of (our time per byte) ÷ (torch fused AdamW's time per byte); 1.0
  means we move memory as fast as torch's hand-written fused kernel;
* ``speed-up vs ref``: reference time ÷ ours (both as ratios to the fused AdamW step beside them).
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import time
from collections.abc import Callable

import torch

import gradkit as gk

from .._kernels import add_compile_hook, compile_available, wait_for_compiles
from ._common import machine, markdown_table, out_dir, progress, pyplot, write

HELP = "median step time of every optimizer and kernel vs torch fused AdamW and the reference packages"

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def _ref(module: str, attr: str, **kw) -> Factory:
    def make(params):
        cls = getattr(importlib.import_module(module), attr)
        return cls(params, **kw)

    make.label = f"{module.split('.')[0]}.{attr}"  # type: ignore[attr-defined]
    return make


def _train_mode(factory: Factory) -> Factory:
    """Schedule-Free references start in eval mode and refuse to step until ``train()`` is called."""

    def make(params):
        opt = factory(params)
        opt.train()
        return opt

    make.label = factory.label  # type: ignore[attr-defined]
    return make


# gradkit class name -> the reference implementation of the same algorithm (same hyper-parameters).
REFERENCES: dict[str, Factory] = {
    "AdamW": _ref("torch.optim", "AdamW", foreach=True),
    "Adam": _ref("torch.optim", "Adam", foreach=True),
    "Lion": _ref("lion_pytorch", "Lion"),
    "AdEMAMix": _ref("pytorch_optimizer", "AdEMAMix"),
    "DiffGrad": _ref("pytorch_optimizer", "DiffGrad"),
    "MARS": _ref("pytorch_optimizer", "MARS"),
    "Gravity": _ref("pytorch_optimizer", "Gravity"),
    # Behavioural only: heavyball's Muon differs in momentum form and shape scaling, and compiles its step.
    "Muon": _ref("heavyball", "Muon"),
    "ScheduleFreeAdamW": _train_mode(_ref("schedulefree", "AdamWScheduleFree")),
    "ScheduleFreeSGD": _train_mode(_ref("schedulefree", "SGDScheduleFree")),
    "DoG": _ref("dog", "DoG"),
    "LDoG": _ref("dog", "LDoG"),
    "DAdaptSGD": _ref("dadaptation", "DAdaptSGD"),
    "DAdaptAdam": _ref("dadaptation", "DAdaptAdam"),
    "Prodigy": _ref("prodigyopt", "Prodigy"),
    # AdaHessian is absent on purpose: its step needs gradients with a graph (backward(create_graph=True)),
    # which this benchmark's synthetic gradients lack (run() leaves it out; see `gradkit bench lm`).
}

# Extra constructor arguments some optimizers need to be stepped with synthetic gradients.
OUR_KWARGS: dict[str, dict] = {}
# torch.optim and the reference packages do not check gradients for NaN/Inf; gradkit's default ("raise") does, for
# one extra read of the gradients. Rows compare the update itself: the check's cost is stated in README.
LIKE_FOR_LIKE = {"on_nonfinite": "ignore"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add this benchmark's options to its ``gradkit bench`` sub-command.

    Args:
        p: The sub-command's parser.
    """
    p.add_argument("--sizes", default="1e7", help="comma-separated parameter counts, e.g. 1e6,1e7,5e7")
    p.add_argument("--opt", default=None, help="comma-separated optimizer classes (default: all in gk.optim)")
    p.add_argument("--kernels", default="compiled,foreach", help="kernels to time (compiled, foreach, loop)")
    p.add_argument("--repeats", type=int, default=15, help="timed steps per measurement (median reported)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference packages")


def our_optimizers() -> list[str]:
    """Every gradkit optimizer class name (``gk.optim.available()``)."""
    return list(gk.optim.available())


def make_params(n: int, n_tensors: int = 40) -> list[torch.Tensor]:
    """``n_tensors`` equal square float32 tensors holding about ``n`` parameters, with fixed random gradients.

    Args:
        n: Total parameters.
        n_tensors: Number of tensors. Default 40.
    """
    side = int(math.sqrt(n / n_tensors))
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(side, side, generator=gen).requires_grad_() for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn(side, side, generator=gen) * 1e-3
    return params


def state_buffers(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    """Parameter-shaped state tensors per parameter (what a step must stream through memory).

    Args:
        opt: The optimizer (after one step).
        params: Its parameters.
    """
    st = opt.state.get(params[0], {})
    return sum(1 for v in st.values() if isinstance(v, torch.Tensor) and v.shape == params[0].shape)


def _stepper(factory: Factory, n: int) -> tuple[Callable[[], None], torch.optim.Optimizer, list[torch.Tensor]]:
    params = make_params(n)
    grads = [p.grad for p in params]
    opt = factory(params)

    def step():
        # Some optimizers (heavyball's) free .grad after stepping: hand every step the same gradients.
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    return step, opt, params


def _measure(factory: Factory, n: int, repeats: int, fused_step: Callable[[], None]) -> dict:
    """Median step time, and the median over rounds of (this step ÷ torch fused AdamW's step right beside it).

    Each round times one step of the row and one step of torch's fused AdamW back to back, so the ratio compares
    two steps taken under the same machine load: on a busy machine the times drift, the paired ratio much less.
    """
    step, opt, params = _stepper(factory, n)
    compiles: list[float] = []
    hook = add_compile_hook(lambda event: compiles.append(event.seconds))
    try:
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        # a layout of 32+ tensors also compiles a wide graph in the background: time the steady state after it
        wait_for_compiles()
    finally:
        hook.remove()
    k = state_buffers(opt, params)
    for _ in range(2):
        step()
        fused_step()
    times, ratios = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        fused_step()
        t2 = time.perf_counter()
        times.append(t1 - t0)
        ratios.append((t1 - t0) / (t2 - t1))
    numel = sum(p.numel() for p in params)
    return dict(ms=statistics.median(times) * 1e3, vs_fused=statistics.median(ratios),
                bytes=(3 + 2 * k) * 4 * numel, numel=numel, first=first, compile=sum(compiles))


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print its tables and write them (and plots) under ``args.out``. Returns the exit code.

    Args:
        args: The parsed command line.
    """
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    # Synthetic gradients carry no graph: an optimizer that needs one (AdaHessian) is timed by `gradkit bench lm`.
    caps = gk.optim.capabilities()
    names = args.opt.split(",") if args.opt else [n for n in our_optimizers() if not caps[n]["needs_graph"]]
    kernels = [k.strip() for k in args.kernels.split(",")]
    if "compiled" in kernels and not compile_available()[0]:
        print(f"torch.compile unavailable ({compile_available()[1]}): timing foreach/loop only")
        kernels = [k for k in kernels if k != "compiled"]
    out = out_dir(args.out)
    report = [f"Machine: {machine()}.", f"Command: `gradkit bench optimizers --sizes {args.sizes}"
              f"{' --opt ' + args.opt if args.opt else ''} --kernels {args.kernels}`"]
    all_rows = []
    for n in sizes:
        fused_step = _stepper(lambda ps: torch.optim.AdamW(ps, fused=True), n)[0]
        jobs: list[tuple[str, str, Factory]] = [
            ("torch.AdamW", "fused", lambda ps: torch.optim.AdamW(ps, fused=True)),
            ("torch.AdamW", "foreach", lambda ps: torch.optim.AdamW(ps, foreach=True)),
        ]
        for name in names:
            cls = getattr(gk.optim, name)
            for k in kernels:
                kw = OUR_KWARGS.get(name, {})
                jobs.append((name, k, lambda ps, cls=cls, k=k, kw=kw: cls(ps, kernel=k, **LIKE_FOR_LIKE, **kw)))
            if not args.no_reference and name in REFERENCES:
                jobs.append((name, "reference", REFERENCES[name]))
        results: dict[tuple[str, str], dict] = {}
        with progress(len(jobs), f"{n:.2g} parameters") as bar:
            for name, k, factory in jobs:
                try:
                    results[(name, k)] = _measure(factory, n, args.repeats, fused_step)
                except Exception as exc:  # a missing reference package must not stop the benchmark
                    results[(name, k)] = dict(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:80])
                bar.advance(description=f"{name} [{k}]")
        fused_bytes = results[("torch.AdamW", "fused")]["bytes"]
        rows = []
        for (name, k), r in results.items():
            if "error" in r:
                rows.append((name, k, r["error"], "", "", "", "", ""))
                continue
            ref = results.get((name, "reference"), {})
            # Both paired with fused AdamW in their own windows: the chained ratio survives a drifting load.
            speedup = ref["vs_fused"] / r["vs_fused"] if "ms" in ref and k != "reference" else float("nan")
            label = getattr(REFERENCES.get(name), "label", "reference") if k == "reference" else k
            rows.append((name, label, round(r["ms"], 2), round(r["bytes"] / r["numel"]),
                         round(r["bytes"] / r["ms"] / 1e6, 1), round(r["vs_fused"] * fused_bytes / r["bytes"], 2),
                         round(speedup, 1) if speedup == speedup else "–",
                         round(r["compile"], 1) if k == "compiled" else "–"))
            all_rows.append((n, name, k, r))
        table = markdown_table(["optimizer", "kernel", "ms/step", "bytes/param", "GB/s", "vs fused AdamW /byte",
                                "speed-up vs ref", "compile s"], rows)
        report.append(f"\n#### {n / 1e6:.1f} M parameters (40 tensors, float32)\n\n{table}")
        print(table)
    write(out / "optimizers.md", "\n".join(report))
    _plot(all_rows, out)
    return 0


def _plot(rows, out) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    n0 = rows[0][0]
    sel = [(name, k, r) for n, name, k, r in rows if n == n0 and "ms" in r]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.28 * len(sel))))
    labels = [f"{name} [{k}]" for name, k, _ in sel]
    gbs = [r["bytes"] / r["ms"] / 1e6 for _, _, r in sel]
    colors = ["tab:gray" if name.startswith("torch") else "tab:orange" if k == "reference" else "tab:blue"
              for name, k, _ in sel]
    ax.barh(range(len(sel)), gbs, color=colors)
    ax.set_yticks(range(len(sel)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("effective memory bandwidth (GB/s, higher is better)")
    ax.set_title(f"optimizer step at {n0 / 1e6:.1f} M parameters (blue: gradkit, orange: reference, grey: torch)")
    fig.tight_layout()
    fig.savefig(out / "optimizers.png", dpi=110)
    print(f"wrote {out / 'optimizers.png'}")
