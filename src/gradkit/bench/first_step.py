"""``gradkit bench first_step``: how long a short job waits for its optimizer, beside torch, cold and warm.

Each measurement is a fresh Python process (so nothing is cached in memory) training an MLP on fixed random
data, batch 64, for 200 steps. Reported per row, medians over ``--repeats`` processes run in interleaved order:

* ``import s``: ``import torch, gradkit`` (the same for every row: gradkit imports torch);
* ``first step s``: optimizer construction + the first training step (forward, backward, ``step()``);
* ``200 steps s``: construction + the first 200 training steps — a whole short job;
* ``steady ms/step``: the median step after those 200 steps, once any background compile has finished: the
  speed the job settles at;
* ``compiles``: update-rule compiles during the job and their total seconds (``b`` = in the background).

``cold`` gives every process a fresh, empty ``TORCHINDUCTOR_CACHE_DIR``; ``warm`` first runs the same job once
(untimed) to fill a cache directory that the timed process then reuses. Models: ``5 tensors`` =
64→256→256→10 (no bias on the last layer), ``40 tensors`` = 20 linear layers of width 256 (1.2 M parameters).
gradkit optimizers run with their defaults (``kernel="auto"``); the ``kernel=compiled`` row shows what waiting for a
compile costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from ._common import machine, markdown_table, out_dir, progress, write

HELP = "time to first step and to 200 steps, cold and warm inductor cache, gradkit vs torch AdamW"

STEPS = 200
OPTIMIZERS = {
    "torch AdamW (default)": ("torch", "AdamW", {}),
    "torch AdamW (fused)": ("torch", "AdamW", {"fused": True}),
    "gradkit AdamW": ("gradkit", "AdamW", {}),
    "gradkit Lion": ("gradkit", "Lion", {"lr": 1e-4}),
    "gradkit AdEMAMix": ("gradkit", "AdEMAMix", {}),
    "gradkit Prodigy": ("gradkit", "Prodigy", {}),
    "gradkit Lion (kernel=compiled)": ("gradkit", "Lion", {"lr": 1e-4, "kernel": "compiled"}),
}
MODELS = {"5 tensors": 5, "40 tensors": 40}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add this benchmark's options to its ``gradkit bench`` sub-command.

    Args:
        p: The sub-command's parser.
    """
    p.add_argument("--repeats", type=int, default=3, help="processes per cell (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each process")
    p.add_argument("--only", default=None, help="comma-separated row labels (exact) or substrings of them to keep")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated models: {', '.join(MODELS)}")
    p.add_argument("--caches", default="cold,warm", help="cold, warm or both")
    p.add_argument("--steps", type=int, default=STEPS, help="steps of the timed job")
    p.add_argument("--steady-steps", type=int, default=50, help="steps timed for the steady-state column")


def _model(n_tensors: int):
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if n_tensors == 5:
            return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 10, bias=False)), 64
        layers: list[nn.Module] = [nn.Linear(256, 256)]
        for _ in range(n_tensors // 2 - 1):
            layers += [nn.ReLU(), nn.Linear(256, 256)]
        return nn.Sequential(*layers), 256


def worker(label: str, n_tensors: int, threads: int, steady_steps: int, import_s: float, steps: int = STEPS) -> dict:
    """One timed job (runs in its own process; see the module docstring).

    Args:
        label: A row of :data:`OPTIMIZERS`.
        n_tensors: 5 or 40 (see the module docstring).
        threads: torch threads.
        steady_steps: Steps timed for the steady-state median.
        import_s: Seconds ``import torch, gradkit`` took in this process.
        steps: Steps of the timed job. Default 200.
    """
    import torch
    import torch.nn.functional as F

    import gradkit as gk
    from gradkit._kernels import add_compile_hook, wait_for_compiles

    torch.set_num_threads(threads)
    lib, name, kw = OPTIMIZERS[label]
    model, d_in = _model(n_tensors)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, d_in, generator=gen)
    out_dim = model(x).shape[1]
    y = torch.randint(0, out_dim, (64,), generator=gen)
    compiles: list = []
    add_compile_hook(compiles.append)

    def train_step(opt):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    opt = getattr(torch.optim if lib == "torch" else gk.optim, name)(model.parameters(), **kw)
    train_step(opt)
    first = time.perf_counter() - t0
    for _ in range(steps - 1):
        train_step(opt)
    total = time.perf_counter() - t0
    wait_for_compiles(timeout=900)
    times = []
    for _ in range(steady_steps):
        s = time.perf_counter()
        train_step(opt)
        times.append(time.perf_counter() - s)
    return dict(import_s=import_s, first_s=first, total_s=total, steady_ms=1e3 * statistics.median(times),
                compiles=len(compiles), compile_s=sum(e.seconds for e in compiles),
                background=all(e.background for e in compiles) if compiles else None,
                n_params=sum(p.numel() for p in model.parameters()))


def _run(label: str, n_tensors: int, args, cache_dir: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, OMP_NUM_THREADS=str(args.threads))
    code = ("import time\nt0 = time.perf_counter()\nimport torch, gradkit\nimp = time.perf_counter() - t0\n"
            "import json\nfrom gradkit.bench.first_step import worker\n"
            f"r = worker({label!r}, {n_tensors}, {args.threads}, {args.steady_steps}, imp, {args.steps})\n"
            "print('RESULT' + json.dumps(r))")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    return dict(error=(res.stderr.strip().splitlines() or ["no output"])[-1][:120])


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print its table and write it under ``args.out``. Returns the exit code.

    Args:
        args: The parsed command line.
    """
    pieces = [s.strip() for s in (args.only or "").split(",") if s.strip()]
    exact = [p for p in pieces if p in OPTIMIZERS]
    labels = [lab for lab in OPTIMIZERS if not pieces or lab in exact
              or any(p in lab for p in pieces if p not in exact)]
    caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not labels or any(c not in ("cold", "warm") for c in caches) or any(m not in MODELS for m in models):
        print(f"nothing to run: rows {list(OPTIMIZERS)}, caches cold/warm, models {list(MODELS)}")
        return 2
    out = out_dir(args.out)
    cells = [(c, m, lab) for c in caches for m in models for lab in labels]
    results: dict[tuple, list[dict]] = {cell: [] for cell in cells}
    with tempfile.TemporaryDirectory(prefix="gradkit-first-step-") as tmp, \
            progress(len(cells) * args.repeats, "first step") as bar:
        warm_dirs = {}
        for r in range(args.repeats):
            for cell in cells:  # interleaved: every cell sees the machine's load of the moment
                cache, model, label = cell
                if cache == "cold":
                    cache_dir = os.path.join(tmp, f"cold-{r}-{cells.index(cell)}")
                else:
                    key = (model, label)
                    if key not in warm_dirs:
                        warm_dirs[key] = os.path.join(tmp, f"warm-{len(warm_dirs)}")
                        _run(label, MODELS[model], args, warm_dirs[key])  # fill the cache, untimed
                    cache_dir = warm_dirs[key]
                results[cell].append(_run(label, MODELS[model], args, cache_dir))
                bar.advance(description=f"{cache} {model} {label}")
    rows, raw = [], {}
    for cache in caches:
        for model in models:
            torch_first = torch_total = None
            for label in labels:
                runs = [x for x in results[(cache, model, label)] if "error" not in x]
                raw[f"{cache}|{model}|{label}"] = results[(cache, model, label)]
                if not runs:
                    rows.append((cache, model, label, results[(cache, model, label)][0]["error"], "", "", "", "", "",
                                 ""))
                    continue
                med = {k: statistics.median(x[k] for x in runs) for k in ("import_s", "first_s", "total_s",
                                                                          "steady_ms", "compile_s")}
                n_comp = max(x["compiles"] for x in runs)
                bg = any(x["background"] for x in runs)
                if label == "torch AdamW (default)":
                    torch_first, torch_total = med["first_s"], med["total_s"]
                rows.append((cache, model, label, round(med["import_s"], 2), round(med["first_s"], 3),
                             round(med["first_s"] / torch_first, 2) if torch_first else "–",
                             round(med["total_s"], 2), round(med["total_s"] / torch_total, 2) if torch_total else "–",
                             round(med["steady_ms"], 2),
                             f"{n_comp} ({med['compile_s']:.1f} s{', b' if bg else ''})" if n_comp else "0"))
    table = markdown_table(["cache", "model", "optimizer", "import s", "first step s", "÷ torch default",
                            f"{args.steps} steps s", "÷ torch default", "steady ms/step", "compiles"], rows)
    report = (f"Machine: {machine()}. Command: `gradkit bench first_step --repeats {args.repeats} --threads "
              f"{args.threads}{' --only ' + args.only if args.only else ''}"
              f"{'' if args.steps == STEPS else f' --steps {args.steps}'}`. Medians of {args.repeats} fresh "
              f"processes per row, interleaved.\n\n{table}")
    print(table)
    write(out / "first_step.md", report)
    write(out / "first_step.json", json.dumps(raw, indent=1))
    return 0
