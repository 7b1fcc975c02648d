"""``gradkit bench local``: local learning rules, M-FAC / Optimistic AMSGrad, and black-box prompt tuning (BBT).

Three parts (``--part rules,optim,bbt``):

* **rules** — Forward-Forward, Mono-Forward, NoProp (DT) and direct feedback alignment on digits next to backprop
  at equal epochs (every method sees the same examples in the same order; AdamW, the best of two learning rates
  per method), with the budget accounting of ``gradkit bench sources``: peak memory of one step as a ratio to one
  inference forward (fresh subprocess per method, resident-set peak) and step time ÷ one no_grad forward of the
  same network, on an activation-heavy network (4 hidden layers of 512, batch 8192).
* **optim** — M-FAC's step time against the window size m (the paper: linear in d·m) beside AdamW, and digits
  accuracy at equal steps for M-FAC, Optimistic AMSGrad, AMSGrad and AdamW.
* **bbt** — a digits MLP trained here and frozen meets shifted digits (each image rolled one pixel to the right;
  ``--bbt-shift flip`` mirrors them); 16 labelled examples per class. BBT (CMA-ES over z ∈ R^d of an input-side
  prompt p = A·z), BBTv2 (one z per layer, layers searched in turn), backprop (Adam) on the same z, backprop on
  the full input prompt, and ESSA's singular values (``LoRASingularValues``, CMA-ES) share one budget of forward
  passes over the few-shot set (an ES candidate costs 1, a full-batch backprop step 3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import gradkit as gk

from ._common import in_fresh_process, machine, markdown_table, median_time, out_dir, proc_status, progress, write

HELP = "local learning rules vs backprop (digits, memory, step time), M-FAC / Optimistic AMSGrad, BBT prompt search"

PARTS = ("rules", "optim", "bbt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    p.add_argument("--epochs", type=int, default=20, help="training epochs of every method on digits (rules)")
    p.add_argument("--quick", action="store_true", help="tiny budgets everywhere (a smoke run)")
    p.add_argument("--skip-memory", action="store_true", help="omit the memory subprocesses (rules)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per method (median reported)")
    p.add_argument("--bbt-shift", default="roll", choices=("roll", "flip"), help="the shifted digits task (bbt)")
    p.add_argument("--bbt-budget", type=int, default=3000, help="forward passes over the few-shot set (bbt)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the bbt comparison (mean and range reported)")


# ---- the local rules ----------------------------------------------------------------------------------------------
def _mlp(sizes, last_act: bool, seed: int) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2 or last_act:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)


class DenoiseBlock(nn.Module):
    """A NoProp block: the input and the noisy label embedding each through a layer, then an MLP to logits."""

    def __init__(self, d_in: int, d_z: int, n_classes: int, width: int):
        super().__init__()
        self.fx = nn.Sequential(nn.Linear(d_in, width), nn.ReLU())
        self.fz = nn.Sequential(nn.Linear(d_z, width), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, n_classes))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.fx(x), self.fz(z)], 1))


def _noprop_blocks(d_in: int, width: int, steps: int, seed: int) -> list[nn.Module]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [DenoiseBlock(d_in, 10, 10, width) for _ in range(steps)]


class _BackpropRule:
    """Backprop on the same chained network, with the local rules' interface (closure returns the batch)."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.source = gk.sources.Backprop(net)

    def parameters(self):
        return self.net.parameters()

    def predict(self, x):
        with torch.no_grad():
            return self.net(x).argmax(1)


# Each method: (label, build(width, depth, seed) -> (rule with .parameters()/.predict(), source, forward(x))).
def _build(name: str, width: int, depth: int, seed: int, d_in: int = 64):
    hidden = (width,) * depth
    if name == "Backprop":
        net = _mlp((d_in, *hidden, 10), False, seed)
        r = _BackpropRule(net)
        return r, r.source, net, lambda x, y: F.cross_entropy(net(x), y)
    if name == "FeedbackAlignment":
        net = _mlp((d_in, *hidden, 10), False, seed)
        r = gk.sources.FeedbackAlignment(net, seed=seed)
        return r, r, net, None
    if name == "MonoForward":
        net = _mlp((d_in, *hidden), True, seed)
        r = gk.sources.MonoForward(net, 10, seed=seed)
        return r, r, net, None
    if name == "ForwardForward":
        net = _mlp((d_in + 10, *hidden), True, seed)
        r = gk.sources.ForwardForward(net, 10, embed="concat", seed=seed)
        return r, r, net, None
    if name == "ForwardForward-all":
        net = _mlp((d_in + 10, *hidden), True, seed)
        r = gk.sources.ForwardForward(net, 10, embed="concat", skip_first=False, seed=seed)
        return r, r, net, None
    if name == "NoProp":
        blocks = _noprop_blocks(d_in, width, 10, seed)
        r = gk.sources.NoProp(blocks, 10, seed=seed)
        return r, r, nn.ModuleList(blocks), None
    raise ValueError(name)


RULES = ("Backprop", "MonoForward", "FeedbackAlignment", "ForwardForward", "ForwardForward-all", "NoProp")
LABELS = {"Backprop": "Backprop (end to end)", "MonoForward": "MonoForward", "FeedbackAlignment":
          "FeedbackAlignment (DFA)", "ForwardForward": "ForwardForward (paper: goodness of all blocks but the first)",
          "ForwardForward-all": "ForwardForward (prediction from the goodness of every block)",
          "NoProp": "NoProp-DT (T = 10 blocks)"}


def _network_forward(name: str, rule, x: torch.Tensor) -> torch.Tensor:
    """One inference forward of the network the rule trains (the blocks chained; NoProp: its inference chain)."""
    if name == "NoProp":
        return rule.logits(x, sample=False)
    if name.startswith("ForwardForward"):
        h = rule.embed_labels(x, torch.zeros(x.shape[0], dtype=torch.long))
        for i, b in enumerate(rule.blocks):
            h = b(rule._block_input(i, h))
        return h
    if name == "Backprop":
        return rule.net(x)
    h = x
    for b in rule.blocks:
        h = b(h)
    return h


def train_rule(name: str, epochs: int, lr: float, *, width: int = 256, depth: int = 2, seed: int = 0,
               batch: int = 64, data=None, on_step: Callable[[], None] | None = None) -> dict:
    """Train one method on digits for ``epochs`` epochs (same batches for every method); test accuracy per epoch."""
    from ..data import digits

    xtr, ytr, xte, yte = data if data is not None else digits(seed=0)
    rule, source, net, closure_loss = _build(name, width, depth, seed)
    pipe = gk.Pipeline(source, optimizer=gk.optim.AdamW(list(rule.parameters()), lr=lr, weight_decay=0.0,
                                                        kernel="foreach"))
    gen = torch.Generator().manual_seed(seed)
    accs, elapsed = [], 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for s in range(0, len(xtr) - batch + 1, batch):
            idx = perm[s:s + batch]
            xb, yb = xtr[idx], ytr[idx]
            closure = (lambda: closure_loss(xb, yb)) if closure_loss else (lambda: (xb, yb))
            t0 = time.perf_counter()
            pipe.step(closure)
            elapsed += time.perf_counter() - t0
            if on_step:
                on_step()
        accs.append(float((rule.predict(xte) == yte).float().mean()))
    n_params = sum(p.numel() for p in rule.parameters())
    return {"method": name, "lr": lr, "acc": accs, "seconds": elapsed, "params": n_params}


def _heavy(quick: bool) -> tuple[int, int, int]:
    """(width, depth, batch) of the activation-heavy network used for memory and step time."""
    return (256, 4, 4096) if quick else (512, 4, 8192)


def memory_child(name: str, quick: bool) -> dict:
    """Run in a fresh process: transient peak memory of one step of ``name`` and of one inference forward."""
    torch.set_num_threads(1)
    width, depth, batch = _heavy(quick)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 64, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    rule, source, net, closure_loss = _build(name, width, depth, 0)
    pipe = gk.Pipeline(source, optimizer=torch.optim.SGD(list(rule.parameters()), lr=1e-4))
    closure = (lambda: closure_loss(x, y)) if closure_loss else (lambda: (x, y))

    def measure(fn) -> int:
        fn()
        fn()
        rest = proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return proc_status("VmHWM") - rest

    def infer():
        with torch.no_grad():
            _network_forward(name, rule, x)

    inference = measure(infer)
    step = measure(lambda: pipe.step(closure))
    params = sum(p.numel() * p.element_size() for p in rule.parameters())
    return {"method": name, "params": params, "inference": params + inference, "step": params + step}


def _memory(quick: bool) -> dict[str, dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    return {name: in_fresh_process("gradkit.bench.local", "memory_child", name, quick, env=env) for name in RULES}


def _step_times(quick: bool, repeats: int) -> dict[str, tuple[float, float]]:
    width, depth, batch = _heavy(quick)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 64, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    out = {}
    for name in RULES:
        rule, source, net, closure_loss = _build(name, width, depth, 0)
        pipe = gk.Pipeline(source, optimizer=torch.optim.SGD(list(rule.parameters()), lr=1e-5))
        closure = (lambda cl=closure_loss: cl(x, y)) if closure_loss else (lambda: (x, y))

        def fwd(rule=rule, name=name):
            with torch.no_grad():
                _network_forward(name, rule, x)

        t_fwd = median_time(fwd, warmup=2, repeats=repeats)
        t_step = median_time(lambda pipe=pipe, closure=closure: pipe.step(closure), warmup=2, repeats=repeats)
        out[name] = (t_step * 1e3, t_step / t_fwd)
    return out


def run_rules(args, out) -> list[str]:
    from ..data import digits

    data = digits(seed=0)
    epochs = 2 if args.quick else args.epochs
    lrs = (3e-3,) if args.quick else (1e-3, 3e-3)
    per_epoch = len(data[0]) // 64
    total = len(RULES) * len(lrs) * epochs * per_epoch
    results: dict[str, dict] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with progress(total, "local rules on digits") as bar:
            for name in RULES:
                for lr in lrs:
                    bar.advance(0, description=f"{name} lr {lr:g}")
                    r = train_rule(name, epochs, lr, data=data, on_step=bar.advance)
                    if name not in results or r["acc"][-1] > results[name]["acc"][-1]:
                        results[name] = r
    finally:
        torch.set_num_threads(threads)
    (out / "local_rules.json").write_text(json.dumps(results))
    marks = sorted({max(1, epochs // 4), epochs})
    times = _step_times(args.quick, 3 if args.quick else args.repeats)
    mem = {} if args.skip_memory else _memory(args.quick)
    width, depth, batch = _heavy(args.quick)
    rows = []
    for name in RULES:
        r = results[name]
        t = times.get(name, (float("nan"), float("nan")))
        m = mem.get(name)
        ratio = m["step"] / m["inference"] if m else float("nan")
        rows.append((LABELS[name], r["params"], f"{r['lr']:g}", *[r["acc"][e - 1] for e in marks],
                     round(r["seconds"], 1), t[1], ratio))
    header = ["method", "parameters", "lr (best of 2)"] + [f"test acc @ {e} epochs" for e in marks] + \
        ["train time (s)", "step time ÷ one forward", "peak memory ÷ inference"]
    return [f"Digits, hidden layers 2 × 256 (NoProp: 10 blocks, each 64→256 and 10→256, then 512→256→10), "
            f"batch 64, AdamW (weight decay 0), every method on the same batches. Step time and memory: "
            f"{depth} hidden layers of {width}, batch {batch}, plain SGD, one intra-op thread.", "",
            markdown_table(header, rows)]


# ---- M-FAC and Optimistic AMSGrad ---------------------------------------------------------------------------------
def run_optim(args, out) -> list[str]:
    from ..data import digits
    from ..models import train_digits

    torch.set_num_threads(1)
    model = _mlp((64, 256, 256, 10), False, 0)
    d = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 64, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))

    def timed(opt) -> float:
        def step():
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            opt.step()
        return median_time(step, warmup=3, repeats=3 if args.quick else args.repeats) * 1e3

    ms = (8, 16, 32) if args.quick else (8, 16, 32, 64, 128, 256)
    t_adam = timed(gk.optim.AdamW(model.parameters(), lr=0.0, kernel="foreach"))
    rows = [("AdamW (foreach)", "–", t_adam, float("nan"))]
    for m in ms:
        t = timed(gk.optim.MFAC(model.parameters(), lr=0.0, m=m))
        rows.append((f"MFAC m = {m}", m, t, t / m))
    lines = [f"MFAC step time vs window size m (d = {d:,} parameters, one thread). Linear in m means "
             "the last column (time per gradient in the window) stays flat.", "",
             markdown_table(["optimizer", "m", "ms per step", "ms per step ÷ m"], rows), ""]
    steps = 100 if args.quick else 600
    data = digits(seed=0)
    configs = [("AdamW", lambda m: gk.optim.AdamW(m.parameters(), lr=3e-3, kernel="foreach")),
               ("AMSGrad (AdamW amsgrad=True, wd 0)",
                lambda m: gk.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0, amsgrad=True, kernel="foreach")),
               ("OptimisticAMSGrad (extrapolation, r = 5)", lambda m: gk.optim.OptimisticAMSGrad(m.parameters(),
                                                                                                 lr=3e-3)),
               ("OptimisticAMSGrad (guess = last gradient)",
                lambda m: gk.optim.OptimisticAMSGrad(m.parameters(), lr=3e-3, predictor="last")),
               ("MFAC (m = 32, λ = 1e-5, lr 1e-3: the authors' lr, tuned for m = 1024)",
                lambda m: gk.optim.MFAC(m.parameters(), lr=1e-3)),
               ("MFAC (m = 32, λ = 1e-5, lr 1e-2, momentum 0.9)",
                lambda m: gk.optim.MFAC(m.parameters(), lr=1e-2, momentum=0.9)),
               ("SGD lr 0.1", lambda m: torch.optim.SGD(m.parameters(), lr=0.1))]
    acc_rows = []
    marks = (steps // 6, steps // 2, steps)
    for label, make in configs:
        t0 = time.perf_counter()
        r = train_digits(make, steps, seed=0, hidden=(256, 256), eval_every=max(1, steps // 6), data=data)
        acc_rows.append((label, *[r.eval.at(s) for s in marks], round(time.perf_counter() - t0, 1)))
    lines += [f"Digits MLP 64-256-256-10, batch 64, {steps} steps, test accuracy:", "",
              markdown_table(["optimizer", *[f"acc @ {s} steps" for s in marks], "wall s"], acc_rows)]
    return lines


# ---- BBT ------------------------------------------------------------------------------------------------------------
def shifted_digits(x: torch.Tensor, shift: str) -> torch.Tensor:
    """8×8 digits rolled one pixel right (``"roll"``, wrapping) or mirrored left-right (``"flip"``)."""
    img = x.reshape(-1, 8, 8)
    img = img.roll(1, dims=2) if shift == "roll" else img.flip(2)
    return img.reshape(-1, 64)


def few_shot(x, y, per_class: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(y == k)[:, 0][torch.randperm(int((y == k).sum()), generator=gen)[:per_class]]
                     for k in range(int(y.max()) + 1)])
    return x[idx], y[idx]


def bbt_compare(model: nn.Module, fx, fy, tx, ty, *, budget: int, d: int, seed: int) -> dict[str, float]:
    """Test accuracy after each method spends ``budget`` forward passes over the few-shot set (fx, fy)."""
    from ..search.spaces import LoRASingularValues, PromptEmbedding

    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]

    def acc() -> float:
        with torch.no_grad():
            return float((model(tx).argmax(1) == ty).float().mean())

    def pop_loss(space, cand, site=None, expand=False):
        with torch.no_grad(), space.population(cand, site=site) if site is not None else space.population(cand):
            inp = fx.expand(len(cand), *fx.shape) if expand else fx.repeat(len(cand), 1)
            logits = model(inp).reshape(len(cand), len(fx), -1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), fy.repeat(len(cand)),
                               reduction="none").view(len(cand), -1).mean(1).double()

    def cma(space, dim, sigma=1.0, **kw):
        es = gk.search.CMAES(torch.zeros(dim, dtype=torch.float64), sigma, seed=seed)
        n = 0
        while n < budget:
            c = es.ask()
            es.tell(c, pop_loss(space, c, **kw))
            n += len(c)
        return es

    def adam(params, steps, lr=0.05):
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            loss = F.cross_entropy(model(fx), fy)
            opt.zero_grad()
            loss.backward()
            opt.step()

    out: dict[str, float] = {"frozen model": acc()}
    sites = lin
    for label, deep in (("BBT: CMA-ES on z ∈ R^d (input-side prompt A·z)", False),
                        (f"BBTv2: CMA-ES, one z ∈ R^d per layer ({len(sites)} layers, searched in turn)", True)):
        shapes = [(m.in_features,) for m in (sites if deep else lin[:1])]
        space = PromptEmbedding(sites if deep else lin[0], shapes, d, mode="add", where="input", seed=seed)
        model(fx)  # BBTv2's projection scale: σ̂ of each site's activations, measured once
        if deep:
            ess = [gk.search.CMAES(torch.zeros(d, dtype=torch.float64), 1.0, seed=seed + i) for i in range(len(sites))]
            n = 0
            while n < budget:
                for i, es in enumerate(ess):
                    c = es.ask()
                    es.tell(c, pop_loss(space, c, site=i))
                    n += len(c)
                    space.set(es.best[0], site=i)
        else:
            space.set(cma(space, d).best[0])
        out[label] = acc()
        space.set(torch.zeros(space.dim))
        space.vector.requires_grad_()
        adam([space.vector], budget // 3)
        out[f"backprop (Adam) on the same z ({'deep' if deep else 'input'} prompt)"] = acc()
        space.remove()
    full = PromptEmbedding(lin[0], (lin[0].in_features,), lin[0].in_features, mode="add", where="input",
                           projection="identity")
    full.vector.requires_grad_()
    adam([full.vector], budget // 3)
    out[f"backprop (Adam) on the full input prompt ({lin[0].in_features} values)"] = acc()
    full.remove()
    rank = max(1, min(d // len(lin), min(min(m.in_features, m.out_features) for m in lin)))
    ls = LoRASingularValues(model, rank=rank)
    es = gk.search.CMAES(ls.x0, 0.25, seed=seed)
    n = 0
    while n < budget:
        c = es.ask()
        es.tell(c, pop_loss(ls, c, expand=True))
        n += len(c)
    with ls.at(es.best[0]):
        out["ESSA: CMA-ES on rank × 3 singular values (LoRASingularValues, no SFT; d = 16 → rank 5, "
            "d = 50 → rank 10)"] = acc()
    ls.remove()
    return out


def run_bbt(args, out) -> list[str]:
    from ..data import digits
    from ..models import train_digits

    torch.set_num_threads(1)
    xtr, ytr, xte, yte = digits(seed=0)
    budget = 300 if args.quick else args.bbt_budget
    seeds = range(1 if args.quick else args.seeds)
    pre = train_digits(lambda m: gk.optim.AdamW(m.parameters(), lr=3e-3, kernel="foreach"), steps=1000, seed=0,
                       hidden=(64, 64), keep_model=True)
    model = pre.model
    for p in model.parameters():
        p.requires_grad_(False)
    tx = shifted_digits(xte, args.bbt_shift)
    per: dict[str, dict[int, list[float]]] = {}
    for d in (16, 50):
        for seed in seeds:
            fx, fy = few_shot(shifted_digits(xtr, args.bbt_shift), ytr, 16, seed)
            for label, a in bbt_compare(model, fx, fy, tx, yte, budget=budget, d=d, seed=seed).items():
                per.setdefault(label, {}).setdefault(d, []).append(a)
    rows = []
    for label, by_d in per.items():
        cells = []
        for d in (16, 50):
            v = by_d.get(d, [])
            cells.append(f"{statistics.mean(v):.3f} ({min(v):.3f}–{max(v):.3f})" if v else "–")
        rows.append((label, *cells))
    (out / "bbt.json").write_text(json.dumps(per))
    shift = "rolled one pixel right" if args.bbt_shift == "roll" else "mirrored left-right"
    return [f"Digits MLP 64-64-64-10 trained on digits (test accuracy {pre.final:.3f}), frozen, then shown digits "
            f"{shift}; 16 labelled examples per class (160) as the training set, the whole shifted test split "
            f"(450) for accuracy. Budget: {budget} forward passes over the 160 examples (a CMA-ES candidate = 1, "
            f"a full-batch backprop step = 3). Test accuracy, mean (min–max) over {len(seeds)} seeds (few-shot "
            "draw, projection and search seeds).", "",
            markdown_table(["method", "d = 16", "d = 50"], rows)]


def run(args: argparse.Namespace) -> int:
    parts = [s.strip() for s in args.part.split(",") if s.strip()]
    bad = set(parts) - set(PARTS)
    if bad:
        raise ValueError(f"--part: unknown {sorted(bad)}; choose from {', '.join(PARTS)}")
    out = out_dir(args.out)
    cmd = "gradkit bench local" + (" --quick" if args.quick else "") + \
        (f" --part {args.part}" if args.part != ",".join(PARTS) else "")
    report = [f"Machine: {machine()}.", f"Command: `{cmd}`", ""]
    if "rules" in parts:
        report += ["### Local learning rules vs backprop on digits", "", *run_rules(args, out), ""]
    if "optim" in parts:
        report += ["### M-FAC and Optimistic AMSGrad", "", *run_optim(args, out), ""]
    if "bbt" in parts:
        report += ["### Black-box prompt tuning (BBT / BBTv2) on shifted digits", "", *run_bbt(args, out), ""]
    text = "\n".join(report)
    print(text)
    write(out / "local.md", text)
    return 0
