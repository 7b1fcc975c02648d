"""``gradkit bench guide``: guided sampling on the digits test-bed — every method at a few scales, side by side.

The test-bed (:mod:`gradkit.guide.testbed`) is a class-conditional flow-matching MLP on 8×8 digits (trained once and
cached), a guide classifier and a noise-aware guide classifier (one half of the training split) and a judge (the
other half; it never guides). Each row samples ``--per-class`` digits of each class from the same initial noise
with :func:`gradkit.guide.sample` and reports: judge accuracy on the requested class, the judge's and the guide's
log-probability of that class (the guide's is the "reward" guidance pushes; a guide/judge gap is reward hacking),
within-class diversity relative to real test digits, Fréchet distance of judge features to the real test digits
(the real-vs-real floor in the header), the pixels' mean overshoot beyond [−1, 1] before clamping (saturation),
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


def _spsa(k: int, eps: float = 1e-2) -> Callable:
    return functools.partial(gk.sources.SPSA, eps=eps, n_directions=k, seed=0)


def _es(pop: int, sigma: float = 1e-2, ranks: bool = False) -> Callable:
    return functools.partial(gk.sources.ES, sigma=sigma, population=pop, rank_shaping=ranks, seed=0)


def rows(low_nfe: tuple[int, ...] = (4, 8)) -> list[Row]:
    """Every row of the benchmark, in table order (``--only`` filters by label substring)."""
    r: list[Row] = [
        Row("unconditional", "none", lambda c: G.Unconditional(), quick=True),
        Row("conditional (w=1)", "none", lambda c: None, quick=True, tags=("cond",)),
    ]
    for w in (1.5, 2.0, 3.0, 5.0, 8.0):
        r.append(Row(f"CFG w={w:g}", "CFG", lambda c, w=w: G.CFG(w), quick=w in (1.5, 3.0, 8.0), tags=(f"cfg{w:g}",)))
    for w in (3.0, 8.0):
        r.append(Row(f"CFG-Zero* w={w:g}", "CFG-Zero*", lambda c, w=w: G.CFGZeroStar(w), quick=w == 3.0))
    for w in (3.0, 5.0, 8.0):
        r.append(Row(f"APG w={w:g} (η=0, β=−0.5, r=15, on x̂1)", "APG", lambda c, w=w: G.APG(w), quick=w == 8.0,
                     tags=(f"apg{w:g}",)))
    for lam in (0.3, 0.6):
        r.append(Row(f"CFG++ λ={lam:g}", "CFG++", lambda c, lam=lam: G.CFGPlusPlus(lam), quick=lam == 0.3))
    r.append(Row("CFG w=3 on t∈[0.2, 0.8)", "interval",
                 lambda c: G.GuidanceInterval(G.CFG(3.0), start=0.2, stop=0.8), quick=True))
    for thr in (0.95, 0.98, 0.99):
        r.append(Row(f"Adaptive Guidance w=3 γ̄={thr:g}", "AG",
                     lambda c, thr=thr: G.AdaptiveGuidance(3.0, threshold=thr), quick=thr == 0.95,
                     tags=(f"ag{thr:g}",)))
    for w in (1.5, 2.0, 3.0):
        r.append(Row(f"Autoguidance w={w:g}", "Autoguidance", lambda c, w=w: G.Autoguidance(c.tb.weak_flow, w),
                     quick=w == 1.5, tags=(f"auto{w:g}",)))
    for s in (1.0, 3.0):
        r.append(Row(f"GFCG s={s:g} (adaptive)", "GFCG", lambda c, s=s: G.GFCG(c.clean(), s), quick=s == 3.0,
                     tags=(f"gfcg{s:g}",)))
    # classifier guidance on the unconditional velocity: backprop vs gradient-free sources, same sampler
    r.append(Row("CG noise-aware w=1 (backprop)", "CG", lambda c: G.ClassifierGuidance(c.noisy(), 1.0)))
    r.append(Row("CG noise-aware w=3 (backprop)", "CG", lambda c: G.ClassifierGuidance(c.noisy(), 3.0), quick=True,
                 tags=("cg3-bp",)))
    for k in (4, 16):
        r.append(Row(f"CG noise-aware w=3 (SPSA K={k})", "CG",
                     lambda c, k=k: G.ClassifierGuidance(c.noisy(), 3.0, source=_spsa(k)), quick=k == 4,
                     tags=(f"cg3-spsa{k}",)))
    r.append(Row("CG noise-aware w=3 (ES pop 16, raw)", "CG",
                 lambda c: G.ClassifierGuidance(c.noisy(), 3.0, source=_es(16)), tags=("cg3-es16",)))
    r.append(Row("CG noise-aware w=3 (ES pop 16, ranks)", "CG",
                 lambda c: G.ClassifierGuidance(c.noisy(), 3.0, source=_es(16, ranks=True)), tags=("cg3-es16r",)))
    r.append(Row("CG noise-aware w=1 on the conditional (backprop)", "CG",
                 lambda c: G.ClassifierGuidance(c.noisy(), 1.0, base=G.Conditional())))
    for w in (1.0, 3.0):
        r.append(Row(f"EluCD w={w:g} (backprop)", "EluCD", lambda c, w=w: G.EluCD(c.clean(smooth=True), w),
                     quick=w == 3.0, tags=(f"elucd{w:g}-bp",)))
    r.append(Row("EluCD w=3 (SPSA K=16)", "EluCD", lambda c: G.EluCD(c.clean(smooth=True), 3.0, source=_spsa(16)),
                 tags=("elucd3-spsa16",)))
    # training-free reward guidance on the conditional velocity: reward = guide log-probability on x̂1
    r += [
        Row("DPS λ=1", "TFG", lambda c: G.DPS(c.reward(), 1.0), quick=True),
        Row("FreeDoM λ=1 (2 recurrences)", "TFG", lambda c: G.FreeDoM(c.reward(), 1.0, n_recur=2)),
        Row("MPGD λ=1 (backprop)", "TFG", lambda c: G.MPGD(c.reward(), 1.0), quick=True, tags=("mpgd-bp",)),
        Row("MPGD λ=1 (SPSA K=16)", "TFG", lambda c: G.MPGD(c.reward(), 1.0, source=_spsa(16)), quick=True,
            tags=("mpgd-spsa16",)),
        Row("MPGD λ=1 (ES pop 16, raw)", "TFG", lambda c: G.MPGD(c.reward(), 1.0, source=_es(16)),
            tags=("mpgd-es16",)),
        Row("TFG λ=1 (ρ=1, μ=1, σ=0.01)", "TFG", lambda c: G.TFG(c.reward(), scale=1.0)),
        Row("FlowChef s=1 (backprop)", "FlowChef", lambda c: G.FlowChef(c.reward(), step_size=1.0), quick=True,
            tags=("flowchef-bp",)),
        Row("FlowChef s=1 (SPSA K=16)", "FlowChef",
            lambda c: G.FlowChef(c.reward(), step_size=1.0, source=_spsa(16)), tags=("flowchef-spsa16",)),
    ]
    # few steps: CFG vs CFG-Zero* (and its two parts alone)
    for n in low_nfe:
        r.append(Row(f"CFG w=3, {n} steps", "CFG", lambda c: G.CFG(3.0), steps=n, quick=True, tags=(f"lo-cfg{n}",)))
        r.append(Row(f"CFG-Zero* w=3, {n} steps", "CFG-Zero*", lambda c: G.CFGZeroStar(3.0), steps=n, quick=True,
                     tags=(f"lo-zero{n}",)))
    n = low_nfe[0]
    r.append(Row(f"CFG-Zero* w=3, {n} steps, zero-init only", "CFG-Zero*",
                 lambda c: G.CFGZeroStar(3.0, use_optimized_scale=False), steps=n, tags=(f"lo-zinit{n}",)))
    r.append(Row(f"CFG-Zero* w=3, {n} steps, optimized scale only", "CFG-Zero*",
                 lambda c: G.CFGZeroStar(3.0, zero_init_steps=0), steps=n, tags=(f"lo-sstar{n}",)))
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
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: these small "
                   "MLPs gain little from more, and timings stay comparable on a shared machine)")
    p.add_argument("--no-grids", action="store_true", help="skip the PNG grids")
    from . import _guide_particles

    _guide_particles.add_arguments(p)   # --part particles (guided sampling part 2) and its options


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
    try:
        out = G.sample(tb.flow, x0.clone(), cond=labels, guidance=guidance, steps=n, method=row.method, seed=seed,
                       progress=False, full_output=True)
    except gk.NonFiniteError as exc:  # a diverging method is a result, not a crash of the benchmark
        print(f"{row.label}: diverged ({exc})")
        nan = float("nan")
        metrics = dict.fromkeys(("accuracy", "judge_logp", "reward", "diversity", "fd", "fd_floor", "overshoot"), nan)
        return Result(row, n, metrics, nan, ctx.reward_rows / len(labels), time.perf_counter() - start,
                      torch.zeros_like(x0))
    seconds = time.perf_counter() - start
    metrics = tb.evaluator(out.x, labels)
    return Result(row, n, metrics, float(out.nfe), ctx.reward_rows / len(labels), seconds, out.x)


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _by_class(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cat([x[labels == c][:k] for c in labels.unique()])


def _table(results: list[Result]) -> str:
    header = ["method", "steps", "NFE", "clf calls", "judge acc", "judge log p", "reward (guide log p)", "diversity",
              "FD", "overshoot", "time (s)"]
    body = [(r.row.label, r.steps, r.nfe, r.reward_calls, r.metrics["accuracy"], r.metrics["judge_logp"],
             r.metrics["reward"], r.metrics["diversity"], r.metrics["fd"], r.metrics["overshoot"],
             r.seconds) for r in results]
    return markdown_table(header, body)


def _claims(results: list[Result]) -> str:
    """Side-by-side comparisons for the papers' testable claims, each with its criterion and the outcome here."""
    tag = {t: r for r in results for t in r.row.tags}
    out: list[str] = []

    def m(r: Result, k: str) -> float:
        return r.metrics[k]

    def pair(title: str, claim: str, criterion: str, names: list[str], holds: Callable[..., bool],
             extra: tuple[str, ...] = ()) -> None:
        if not all(n in tag for n in names):
            return
        rs = [tag[n] for n in names]
        ok = holds(*rs)
        shown = rs + [tag[n] for n in extra if n in tag]
        out.append(f"**{title}** — claim: {claim}. Criterion: {criterion} → **{'holds' if ok else 'does not hold'} "
                   f"here**.\n\n" + _table(shown) + "\n")

    for w in ("5", "8"):
        pair(f"APG vs CFG at w={w}", "APG removes CFG's oversaturation at high guidance scales (Sadat et al.)",
             "APG's overshoot and FD both below CFG's, judge accuracy within 0.02", [f"cfg{w}", f"apg{w}"],
             lambda c, a: m(a, "overshoot") < m(c, "overshoot") and m(a, "fd") < m(c, "fd")
             and m(a, "accuracy") >= m(c, "accuracy") - 0.02)
    for n in sorted({int(t[6:]) for t in tag if t.startswith("lo-cfg")}):
        pair(f"CFG-Zero* vs CFG with {n} steps", "CFG-Zero* improves on CFG for flow-matching models (Fan et al.)",
             "same steps (zero-init spends fewer NFE); CFG-Zero*'s FD below CFG's, judge accuracy within 0.02",
             [f"lo-cfg{n}", f"lo-zero{n}"],
             lambda c, z: m(z, "fd") < m(c, "fd") and m(z, "accuracy") >= m(c, "accuracy") - 0.02,
             extra=(f"lo-zinit{n}", f"lo-sstar{n}"))
    for thr in ("0.95", "0.98", "0.99"):
        pair(f"Adaptive Guidance (γ̄={thr}) vs CFG w=3", "AG preserves CFG's quality with ~25 % less computation "
             "(Castillo et al.)", "AG ≤ 80 % of CFG's NFE, judge accuracy within 0.01, FD ≤ 110 % of CFG's",
             ["cfg3", f"ag{thr}"],
             lambda c, a: a.nfe <= 0.8 * c.nfe and m(a, "accuracy") >= m(c, "accuracy") - 0.01
             and m(a, "fd") <= 1.1 * m(c, "fd"))
    pair("Autoguidance vs CFG at w=1.5", "guiding with a weaker model improves quality without CFG's loss of "
         "variation (Karras et al.)", "Autoguidance's diversity above CFG's and its FD below the conditional's",
         ["cond", "cfg1.5", "auto1.5"],
         lambda c, g, a: m(a, "diversity") > m(g, "diversity") and m(a, "fd") < m(c, "fd"))
    pair("GFCG vs CFG at equal NFE (64)", "guiding away from the most confusable class raises class accuracy "
         "without CFG's cost in FD (Gradient-Free Classifier Guidance)",
         "GFCG's judge accuracy ≥ CFG w=1.5's and its FD ≤ CFG w=1.5's", ["cfg1.5", "gfcg3"],
         lambda c, g: m(g, "accuracy") >= m(c, "accuracy") and m(g, "fd") <= m(c, "fd"), extra=("cond",))
    for other in ("cg3-spsa4", "cg3-spsa16", "cg3-es16", "cg3-es16r"):
        pair(f"{tag[other].row.label if other in tag else other} vs backprop",
             "a zeroth-order source can replace backprop for the classifier gradient (gradkit)",
             "same NFE; judge accuracy within 0.02 of backprop's, FD ≤ 120 % of backprop's", ["cg3-bp", other],
             lambda b, z: z.nfe == b.nfe and m(z, "accuracy") >= m(b, "accuracy") - 0.02
             and m(z, "fd") <= 1.2 * m(b, "fd"))
    for other in ("elucd3-spsa16",):
        pair("EluCD w=3: SPSA K=16 vs backprop", "the same for an off-the-shelf classifier on x̂1 (gradkit)",
             "same NFE; judge accuracy within 0.02, FD ≤ 120 %", ["elucd3-bp", other],
             lambda b, z: z.nfe == b.nfe and m(z, "accuracy") >= m(b, "accuracy") - 0.02
             and m(z, "fd") <= 1.2 * m(b, "fd"))
    for base, other in (("mpgd-bp", "mpgd-spsa16"), ("mpgd-bp", "mpgd-es16"), ("flowchef-bp", "flowchef-spsa16")):
        pair(f"reward guidance: {tag[other].row.label if other in tag else other} vs backprop",
             "a black-box reward guides through SPSA / ES as well as through backprop (gradkit)",
             "same NFE; guide log-probability (the reward) and judge accuracy within 0.02 of backprop's",
             [base, other],
             lambda b, z: z.nfe == b.nfe and m(z, "reward") >= m(b, "reward") - 0.02
             and m(z, "accuracy") >= m(b, "accuracy") - 0.02)
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "part", "methods") == "particles":
        from . import _guide_particles

        return _guide_particles.run(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick or args.tiny
    per_class = args.per_class or (4 if args.tiny else 30 if args.quick else 100)
    steps = 4 if args.tiny else args.steps
    keep = [s.strip() for s in args.only.split(",")] if args.only else []
    selected = [r for r in rows(low_nfe=(2,) if args.tiny else (4, 8))
                if (not quick or r.quick) and (not keep or any(k in r.label for k in keep))]
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
