"""``gradkit bench guide``: guided sampling on the digits test-bed — every method at a few scales, side by side.

The test-bed (:mod:`gradkit.guide.testbed`) is a class-conditional flow-matching MLP on 8×8 digits (trained once and
cached), a guide classifier and a noise-aware guide classifier (one half of the training split) and a judge (the
other half; it never guides). Each row samples ``--per-class`` digits of each class from the same initial noise
with :func:`gradkit.guide.sample` and reports: judge accuracy on the requested class, the judge's and the guide's
log-probability of that class (the guide's is the "reward" guidance pushes; a guide/judge gap is reward hacking),
within-class diversity relative to real test digits, Fréchet distance of judge features to the real test digits
(the real-vs-real floor in the header), the fraction of pixels outside [−1, 1] before clamping (saturation),
network evaluations (NFE) and classifier/reward evaluations per sample, and the wall time of the sampling.

Then four comparisons where a paper makes a claim testable at this scale, each with its criterion and whether it
held here: APG vs CFG at a high scale, CFG-Zero* vs CFG at low NFE, Adaptive Guidance's NFE saving at equal
quality, gradient-free (SPSA / ES) vs backprop classifier guidance at equal NFE. A PNG grid of samples per method
(one row per class) goes to ``--out/grids``, and an overview to ``--out/guide.png``.
"""

from __future__ import annotations

import argparse
import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import gradkit as gk
from gradkit import guide as G
from gradkit.guide import testbed as T

from ._common import machine, markdown_table, out_dir, progress, write

HELP = "guided sampling on digits: CFG family, classifier and reward guidance with backprop / SPSA / ES gradients"


class Counted:
    """A callable that counts the rows (samples) it has been evaluated on."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn, self.rows = fn, 0

    def __call__(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.fn(x, *args)


@dataclass
class Ctx:
    """What a row's factory gets: the test-bed, the requested labels and counted classifiers / rewards."""

    tb: T.Testbed
    labels: torch.Tensor
    counters: list[Counted] = field(default_factory=list)

    def count(self, fn: Callable[..., torch.Tensor]) -> Counted:
        c = Counted(fn)
        self.counters.append(c)
        return c

    @property
    def reward_rows(self) -> int:
        return sum(c.rows for c in self.counters)

    def clean(self, smooth: bool = False) -> Counted:
        """The guide classifier on clean images (``smooth``: ReLU → Softplus(3), EluCD's calibration)."""
        net = G.relu_to_softplus(self.tb.guide, 3.0) if smooth else self.tb.guide
        return self.count(net)

    def noisy(self) -> Counted:
        """The noise-aware guide classifier ``logits(x_t, t)``."""
        return self.count(self.tb.noisy_guide)

    def reward(self) -> Counted:
        """Log-reward of a data point: the guide classifier's log-probability of the requested class."""
        net, rows = self.tb.guide, torch.arange(len(self.labels))
        return self.count(lambda x: torch.log_softmax(net(x), dim=1)[rows, self.labels])


@dataclass(frozen=True)
class Row:
    """One benchmark row: a label, the method family, a factory of the guidance and the sampler settings."""

    label: str
    family: str
    build: Callable[[Ctx], G.Guidance | None]
    steps: int | None = None  # None: --steps
    method: str = "euler"
    quick: bool = False  # part of --quick
    tags: tuple[str, ...] = ()


def _spsa(k: int, eps: float = 0.05) -> Callable:
    return functools.partial(gk.sources.SPSA, eps=eps, n_directions=k, seed=0)


def _es(pop: int, sigma: float = 0.05) -> Callable:
    return functools.partial(gk.sources.ES, sigma=sigma, population=pop, seed=0)


def rows(low_nfe: tuple[int, ...] = (4, 8)) -> list[Row]:
    """Every row of the benchmark (``--only`` filters by label substring)."""
    r: list[Row] = [
        Row("unconditional", "none", lambda c: G.Unconditional(), quick=True),
        Row("conditional (w=1)", "none", lambda c: None, quick=True),
    ]
    for w in (1.5, 2.0, 3.0, 5.0, 8.0):
        r.append(Row(f"CFG w={w:g}", "CFG", lambda c, w=w: G.CFG(w), quick=w in (3.0, 8.0), tags=(f"cfg{w:g}",)))
    for w in (3.0, 8.0):
        r.append(Row(f"CFG-Zero* w={w:g}", "CFG-Zero*", lambda c, w=w: G.CFGZeroStar(w), quick=w == 3.0))
    for w in (3.0, 5.0, 8.0):
        r.append(Row(f"APG w={w:g} (η=0, β=−0.5, r=15, x̂1)", "APG", lambda c, w=w: G.APG(w), quick=w == 8.0,
                     tags=(f"apg{w:g}",)))
    for lam in (0.05, 0.1):
        r.append(Row(f"CFG++ λ={lam:g}", "CFG++", lambda c, lam=lam: G.CFGPlusPlus(lam), quick=lam == 0.1))
    r.append(Row("CFG w=3 on t∈[0.2, 0.8)", "interval", lambda c: G.GuidanceInterval(G.CFG(3.0), start=0.2, stop=0.8),
                 quick=True))
    for thr in (0.99, 0.999):
        r.append(Row(f"Adaptive Guidance w=3 γ̄={thr:g}", "AG", lambda c, thr=thr: G.AdaptiveGuidance(3.0, threshold=thr),
                     quick=thr == 0.99, tags=(f"ag{thr:g}",)))
    for w in (1.5, 2.0, 3.0):
        r.append(Row(f"Autoguidance w={w:g}", "Autoguidance", lambda c, w=w: G.Autoguidance(c.tb.weak_flow, w),
                     quick=w == 2.0))
    for s in (1.0, 3.0):
        r.append(Row(f"GFCG s={s:g} + CFG w=2", "GFCG", lambda c, s=s: G.GFCG(c.clean(), s, base=G.CFG(2.0)),
                     quick=s == 1.0))
    # classifier guidance: backprop vs gradient-free sources, same sampler (equal NFE)
    for w in (1.0, 3.0):
        r.append(Row(f"CG noise-aware w={w:g} (backprop)", "CG",
                     lambda c, w=w: G.ClassifierGuidance(c.noisy(), w), quick=w == 3.0, tags=(f"cg{w:g}-bp",)))
    for k in (4, 16):
        r.append(Row(f"CG noise-aware w=3 (SPSA K={k})", "CG",
                     lambda c, k=k: G.ClassifierGuidance(c.noisy(), 3.0, source=_spsa(k)), quick=k == 16,
                     tags=(f"cg3-spsa{k}",)))
    r.append(Row("CG noise-aware w=3 (ES pop 16)", "CG", lambda c: G.ClassifierGuidance(c.noisy(), 3.0, source=_es(16)),
                 tags=("cg3-es16",)))
    for w in (1.0, 3.0):
        r.append(Row(f"EluCD w={w:g} (backprop)", "EluCD", lambda c, w=w: G.EluCD(c.clean(smooth=True), w),
                     quick=w == 3.0))
    r.append(Row("EluCD w=3 (SPSA K=16)", "EluCD",
                 lambda c: G.EluCD(c.clean(smooth=True), 3.0, source=_spsa(16))))
    # training-free reward guidance: reward = guide log-probability of the requested class on x̂1
    r += [
        Row("DPS λ=1", "TFG", lambda c: G.DPS(c.reward(), 1.0), quick=True),
        Row("FreeDoM λ=1 (1 recurrence)", "TFG", lambda c: G.FreeDoM(c.reward(), 1.0, n_recur=2)),
        Row("MPGD λ=1 (backprop)", "TFG", lambda c: G.MPGD(c.reward(), 1.0), quick=True, tags=("mpgd-bp",)),
        Row("MPGD λ=1 (SPSA K=16)", "TFG", lambda c: G.MPGD(c.reward(), 1.0, source=_spsa(16)), quick=True,
            tags=("mpgd-spsa16",)),
        Row("MPGD λ=1 (ES pop 16)", "TFG", lambda c: G.MPGD(c.reward(), 1.0, source=_es(16)), tags=("mpgd-es16",)),
        Row("TFG λ=1 (ρ=1, μ=1, σ=0.01)", "TFG", lambda c: G.TFG(c.reward(), scale=1.0)),
        Row("FlowChef s=1 (backprop)", "FlowChef", lambda c: G.FlowChef(c.reward(), step_size=1.0), quick=True),
        Row("FlowChef s=1 (SPSA K=16)", "FlowChef",
            lambda c: G.FlowChef(c.reward(), step_size=1.0, source=_spsa(16))),
    ]
    # low NFE: CFG vs CFG-Zero* with few steps
    for n in low_nfe:
        r.append(Row(f"CFG w=3, {n} steps", "CFG", lambda c: G.CFG(3.0), steps=n, quick=True, tags=(f"lo-cfg{n}",)))
        r.append(Row(f"CFG-Zero* w=3, {n} steps", "CFG-Zero*", lambda c: G.CFGZeroStar(3.0), steps=n, quick=True,
                     tags=(f"lo-zero{n}",)))
    return r


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="30 samples per class and the rows marked quick")
    p.add_argument("--tiny", action="store_true", help="smoke run: a test-bed trained in seconds, 4 per class, "
                   "4 steps (numbers are meaningless)")
    p.add_argument("--per-class", type=int, default=None, help="samples per class (default 100; --quick 30)")
    p.add_argument("--steps", type=int, default=32, help="sampler steps (Euler) for every row without its own")
    p.add_argument("--only", default=None, help="comma-separated substrings of row labels to keep")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--no-cache", action="store_true", help="retrain the test-bed and do not write the cache")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-grids", action="store_true", help="skip the PNG grids")


@dataclass
class Result:
    row: Row
    steps: int
    metrics: dict[str, float]
    nfe: float
    reward_calls: float
    seconds: float
    samples: torch.Tensor


def run_row(row: Row, tb: T.Testbed, x0: torch.Tensor, labels: torch.Tensor, steps: int, seed: int) -> Result:
    ctx = Ctx(tb, labels)
    guidance = row.build(ctx)
    n = row.steps or steps
    start = time.perf_counter()
    out = G.sample(tb.flow, x0.clone(), cond=labels, guidance=guidance, steps=n, method=row.method, seed=seed,
                   progress=False, full_output=True)
    seconds = time.perf_counter() - start
    metrics = tb.evaluator(out.x, labels)
    return Result(row, n, metrics, float(out.nfe), ctx.reward_rows / len(labels), seconds, out.x)


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _by_class(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cat([x[labels == c][:k] for c in labels.unique()])


def _table(results: list[Result]) -> str:
    header = ["method", "steps", "NFE", "clf calls", "judge acc", "judge log p", "reward (guide log p)", "diversity",
              "FD", "out of [−1,1] %", "time (s)"]
    body = [(r.row.label, r.steps, r.nfe, r.reward_calls, r.metrics["accuracy"], r.metrics["judge_logp"],
             r.metrics["reward"], r.metrics["diversity"], r.metrics["fd"], 100 * r.metrics["out_of_range"],
             r.seconds) for r in results]
    return markdown_table(header, body)


def _claims(results: list[Result]) -> str:
    """Side-by-side comparisons for the papers' testable claims, each with its criterion and the outcome."""
    tag = {t: r for r in results for t in r.row.tags}
    out: list[str] = []

    def pair(title: str, claim: str, criterion: str, names: list[str], holds: Callable[..., bool]) -> None:
        rs = [tag[n] for n in names if n in tag]
        if len(rs) < len(names):
            return
        ok = holds(*rs)
        out.append(f"**{title}** — claim: {claim}\n\ncriterion: {criterion} → **{'holds' if ok else 'does not hold'}"
                   f" here**\n\n" + _table(rs) + "\n")

    m = lambda r, k: r.metrics[k]  # noqa: E731
    for w in ("8", "5"):
        pair(f"APG vs CFG at w={w}", "APG removes CFG's oversaturation at high guidance scales",
             "APG has fewer out-of-range pixels and a lower FD than CFG, accuracy within 0.02",
             [f"cfg{w}", f"apg{w}"],
             lambda c, a: m(a, "out_of_range") < m(c, "out_of_range") and m(a, "fd") < m(c, "fd")
             and m(a, "accuracy") >= m(c, "accuracy") - 0.02)
    for n in sorted({int(t[6:]) for t in tag if t.startswith("lo-cfg")}):
        pair(f"CFG-Zero* vs CFG at {n} steps", "CFG-Zero* improves on CFG for flow models, notably with few steps",
             "CFG-Zero* has a lower FD than CFG at the same NFE budget, accuracy within 0.02",
             [f"lo-cfg{n}", f"lo-zero{n}"],
             lambda c, z: m(z, "fd") < m(c, "fd") and m(z, "accuracy") >= m(c, "accuracy") - 0.02)
    for thr in ("0.99", "0.999"):
        pair(f"Adaptive Guidance (γ̄={thr}) vs CFG", "AG preserves CFG's quality with ~25 % less computation",
             "AG uses ≤ 80 % of CFG's NFE, accuracy within 0.01 and FD within 10 % of CFG's",
             ["cfg3", f"ag{thr}"],
             lambda c, a: a.nfe <= 0.8 * c.nfe and m(a, "accuracy") >= m(c, "accuracy") - 0.01
             and m(a, "fd") <= 1.1 * m(c, "fd"))
    for other in ("cg3-spsa16", "cg3-spsa4", "cg3-es16"):
        pair(f"gradient-free vs backprop classifier guidance ({other[4:]})",
             "a zeroth-order gradient source can replace backprop in classifier guidance (gradkit's claim)",
             "same NFE; accuracy within 0.05 of backprop's and FD within 20 %",
             ["cg3-bp", other],
             lambda b, z: z.nfe == b.nfe and m(z, "accuracy") >= m(b, "accuracy") - 0.05
             and m(z, "fd") <= 1.2 * m(b, "fd"))
    for other in ("mpgd-spsa16", "mpgd-es16"):
        pair(f"gradient-free vs backprop reward guidance (MPGD, {other[5:]})",
             "a black-box reward guides through SPSA / ES as well as through backprop",
             "same NFE; reward within 10 % of backprop's gain over the conditional sampler, accuracy within 0.05",
             ["mpgd-bp", other],
             lambda b, z: z.nfe == b.nfe and m(z, "accuracy") >= m(b, "accuracy") - 0.05)
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick or args.tiny
    per_class = args.per_class or (4 if args.tiny else 30 if args.quick else 100)
    steps = 4 if args.tiny else args.steps
    selected = [r for r in rows(low_nfe=(2,) if args.tiny else (4, 8))
                if (not quick or r.quick) and (not args.only or any(s.strip() in r.label for s in args.only.split(",")))]
    if not selected:
        print(f"no row matches --only {args.only!r}; rows: {[r.label for r in rows()]}")
        return 2
    start = time.perf_counter()
    tb = T.load("tiny" if args.tiny else "full", cache=not args.no_cache)
    setup = time.perf_counter() - start
    labels = torch.arange(10).repeat_interleave(per_class)
    x0 = torch.randn(len(labels), 64, generator=torch.Generator().manual_seed(args.seed))
    real = tb.evaluator(tb.data[2], tb.data[3])
    results: list[Result] = []
    with progress(len(selected), "guided sampling") as bar:
        for row in selected:
            bar.advance(0, description=row.label)
            results.append(run_row(row, tb, x0, labels, steps, args.seed))
            bar.advance()
    out = out_dir(args.out)
    trained = ", ".join(f"{k} {v:.0f} s" for k, v in tb.train_seconds.items() if v) or "all loaded from the cache"
    head = (f"gradkit bench guide — {len(labels)} samples ({per_class} per class), Euler, {steps} steps unless stated; "
            f"machine: {machine()}; test-bed setup {setup:.1f} s ({trained}). Real test digits scored by the judge: "
            f"accuracy {real['accuracy']:.3f}; FD floor (real train vs test, {len(labels)} digits) "
            f"{results[0].metrics['fd_floor']:.2f}. FD = Fréchet distance of judge features to the 449 test digits; "
            f"diversity = within-class pairwise distance / real; NFE = flow evaluations per sample; clf calls = "
            f"classifier / reward evaluations per sample.")
    table = _table(results)
    claims = _claims(results)
    text = head + "\n\n" + table + ("\n\n## Claims\n\n" + claims if claims else "")
    print(text)
    write(out / "guide.md", text)
    if not args.no_grids:
        grids = out / "grids"
        for r in results:
            T.save_grid(grids / f"{_slug(r.row.label)}.png", [(r.row.label, _by_class(r.samples, labels, 8))], nrow=10)
        picks = [r for r in results if r.row.quick][:12]
        path = T.save_grid(out / "guide.png", [(r.row.label, _by_class(r.samples, labels, 6)) for r in picks], nrow=10)
        if path is not None:
            print(f"sample grids: {grids}/, overview {path}")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0
