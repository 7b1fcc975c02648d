"""``gradkit bench guide --part particles``: reward against compute on the digits test-bed for the population and
input-optimisation methods of guided sampling (part 2), beside part 1's gradient guidance.

The unconditional flow-matching model of :mod:`gradkit.guide.testbed` is steered towards a reward, two of them:

* ``logp`` — the guide classifier's log-probability of a target class (10 classes × ``--per-class`` samples); the
  judge (a classifier trained on the other half of the data, which never steers) scores the result: judge accuracy
  and log-probability, within-class diversity, Fréchet distance (FD) of judge features to real test digits. Reward
  hacking shows as the reward rising while the judge's accuracy, the diversity or the FD do not follow.
* ``ink`` — the fraction of inked pixels (> 0) in the top-left 4×4 quadrant: a step function of the pixels, whose
  gradient is zero almost everywhere, so only black-box methods can use it (gradient methods are shown failing).

Methods and their compute per output sample (NFE = flow evaluations; a backward pass through one step counts as
one more): best-of-N (N samples, keep the best), FK steering with each potential (N particles, SDE, the best final
particle), look-ahead search (R candidates per step, Free²Guide-style), part 1's classifier guidance and DPS,
D-Flow (L-BFGS through the solve), FlowOpt-style (the last 4 steps, Jacobian-free ascent on the latent), and noise
search with SPSA (a gk.Pipeline per sample) and CMA-ES (gk.search in a 16-dimensional subspace). Writes
``guide_particles.md`` (tables and the FK steering claim), ``guide_particles.png`` (reward and judge accuracy
against NFE) and ``guide_particles_grid.png`` (samples).
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import gradkit as gk
from gradkit import guide as G
from gradkit.guide import testbed as T

from ._common import load_note, machine, markdown_table, out_dir, pyplot, write

Tensor = torch.Tensor


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``--part particles`` (the others are ``gradkit bench guide``'s).

    Args:
        p: the ``bench guide`` parser.
    """
    p.add_argument("--part", choices=("methods", "particles"), default="methods",
                   help="methods: part 1's table (default); particles: reward vs compute for best-of-N, FK "
                        "steering, look-ahead search, D-Flow, FlowOpt and noise search")
    p.add_argument("--lam", type=float, default=10.0, help="--part particles: FK steering's λ (default 10, the "
                   "authors' scripts)")
    p.add_argument("--rewards", default="logp,ink", help="--part particles: comma-separated rewards (logp, ink)")
    p.add_argument("--claim-seeds", type=int, default=5, help="--part particles: seeds of the best-of-N / FK "
                   "steering comparison (default 5)")


# ------------------------------------------------------------------ rewards
class Counter:
    """Counts the rows a reward / classifier is evaluated on."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        self.fn, self.rows = fn, 0

    def __call__(self, x: Tensor, *a: Any) -> Tensor:
        self.rows += x.shape[0]
        return self.fn(x, *a)


class ClassLogProb:
    """``log p_guide(c | x)`` of each row's target class; a batch of ``k·n`` rows (k candidates or particles per
    target, contiguous, as the population methods lay them out) repeats each of the n targets k times."""

    def __init__(self, guide: torch.nn.Module, labels: Tensor):
        self.guide, self.labels = guide, labels

    def __call__(self, x: Tensor) -> Tensor:
        k, rem = divmod(x.shape[0], len(self.labels))
        if rem or k == 0:
            raise ValueError(f"{x.shape[0]} rows for {len(self.labels)} targets")
        lab = self.labels.repeat_interleave(k) if k > 1 else self.labels
        return torch.log_softmax(self.guide(x.clamp(-1.0, 1.0)), dim=1)[torch.arange(x.shape[0]), lab]


def ink(x: Tensor) -> Tensor:
    """Fraction of inked pixels (> 0) in the top-left 4×4 quadrant: a step function (zero gradient a.e.)."""
    return (x.reshape(-1, 8, 8)[:, :4, :4] > 0).to(x.dtype).mean(dim=(1, 2))


# ------------------------------------------------------------------ one measurement
@dataclass
class Point:
    """One method at one budget."""

    reward: str
    family: str
    label: str
    x: Tensor
    nfe: float
    reward_calls: float
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Setup:
    tb: Any
    labels: Tensor
    steps: int
    seed: int
    lam: float

    @property
    def n(self) -> int:
        return len(self.labels)

    def noise(self, k: int = 1, offset: int = 0) -> Tensor:
        """``[k·n, 64]`` initial noise; k > 1 gives each target k contiguous candidates (seeded by k)."""
        g = torch.Generator().manual_seed(self.seed * 1000 + k + offset)
        return torch.randn(self.n * k, 64, generator=g)


def _best(x: Tensor, rewards: Tensor, n: int) -> Tensor:
    k = x.shape[0] // n
    r = rewards.reshape(n, k)
    return x.reshape(n, k, -1)[torch.arange(n), r.argmax(1)]


def methods(kind: str, s: Setup, budgets: dict[str, tuple]) -> list[tuple[str, str, Callable[[Counter], tuple]]]:
    """``(family, label, run)`` for every row; ``run(reward) -> (x [n, 64], nfe per sample)``."""
    flow, S, n = s.tb.flow, s.steps, s.n
    out: list[tuple[str, str, Callable[[Counter], tuple]]] = []
    out.append(("baseline", "unconditional (Euler)",
                lambda r: (G.sample(flow, s.noise(), steps=S), float(S))))
    out.append(("baseline", "unconditional (SDE)",
                lambda r: (G.sample(flow, s.noise(), steps=S, method="sde", seed=s.seed), float(S))))
    for N in budgets["bon"]:
        def bon(r, N=N):
            o = G.BestOfN(r, N, comm=None).run(flow, s.noise(N), steps=S, method="euler", seed=s.seed)
            return o.x, o.nfe * N
        out.append(("best-of-N", f"best-of-N N={N}", bon))
    for pot in ("diff", "max", "sum", "rt"):
        for N in budgets["fk"]:
            def fk(r, N=N, pot=pot):
                m = G.FKSteering(r, s.lam, potential=pot, n_particles=N, comm=None, seed=s.seed)
                o = m.run(flow, s.noise(N), steps=S, seed=s.seed)
                return _best(o.x, m.rewards, n), o.nfe * N
            out.append((f"FK {pot}", f"FK steering {pot} N={N}", fk))
    for R in budgets["lookahead"]:
        def la(r, R=R):
            o = G.LookAheadSearch(r, R, comm=None, seed=s.seed).run(flow, s.noise(), steps=S, seed=s.seed)
            return o.x, o.nfe
        out.append(("look-ahead", f"look-ahead search R={R}", la))
    if kind == "logp":
        def cg(r):
            clf = Counter(s.tb.noisy_guide)
            o = G.sample(flow, s.noise(), cond=s.labels, steps=S, guidance=G.ClassifierGuidance(clf, 3.0),
                         full_output=True)
            r.rows += clf.rows
            return o.x, o.nfe
        out.append(("classifier guidance (part 1)", "classifier guidance w=3 (noise-aware clf)", cg))

        def dps(r):
            o = G.sample(flow, s.noise(), steps=S, guidance=G.DPS(r, 0.03, base=G.Unconditional()),
                         full_output=True)
            return o.x, o.nfe + S           # + one backward through the model per step
        out.append(("DPS (part 1)", "DPS λ=0.03 (reward gradient through the model)", dps))
    for it in budgets["dflow"]:
        def dflow(r, it=it):
            o = G.DFlow(lambda x: -r(x), steps=S, method="euler", iters=it, reg="chi").run(flow, s.noise())
            return o.x1, o.nfe + o.info["backward"] * S
        out.append(("D-Flow", f"D-Flow {it} L-BFGS steps{' (zero gradient)' if kind == 'ink' else ''}", dflow))
    if kind == "logp":
        for it in budgets["flowopt"]:
            def flowopt(r, it=it):
                fo = G.FlowOpt(loss=lambda x: -r(x), eta=0.5, iters=it, steps=S, n_max=max(1, min(4, S // 4)),
                               check="off")
                start = G.Sampler(flow, times=G.time_grid(S)[:S - fo.n_max + 1]).run(s.noise())
                o = fo.run(flow, start.x)
                return o.x1, start.nfe + o.nfe
            out.append(("FlowOpt-style", f"FlowOpt-style {it} iterations (η=0.5, last 4 steps)", flowopt))
    for it in budgets["spsa"]:
        def spsa(r, it=it):
            # One batched run: the closure returns every sample's loss and SPSA gives each row its own
            # directions, so no sample's estimate carries another's reward noise.
            o = G.NoiseSearch(lambda x: -r(x), steps=S).optimize(
                flow, s.noise(), iters=it, optimizer=lambda p: torch.optim.Adam(p, lr=0.1),
                source=functools.partial(gk.sources.SPSA, eps=0.05, n_directions=4, seed=s.seed, comm=None),
                per_sample_closure=True)
            return o.x1, o.evaluations * S
        out.append(("noise search SPSA", f"noise search SPSA K=4, {it} Adam steps", spsa))
    for ev in budgets["cmaes"]:
        def cmaes(r, ev=ev):
            xs, evals = [], 0
            x0 = s.noise()
            for b in range(n):
                def loss(x, b=b):
                    return -_row_reward(r, x, b, n)
                o = G.NoiseSearch(loss, steps=S, subspace=min(16, 64)).search(
                    flow, x0[b:b + 1], method="cmaes", sigma0=0.5, budget=ev, seed=s.seed + b)
                xs.append(o.x1)
                evals += o.evaluations
            return torch.cat(xs), evals * S / n
        out.append(("noise search CMA-ES", f"noise search CMA-ES (16-d subspace), {ev} evaluations", cmaes))
    return out


def _row_reward(r: Counter, x: Tensor, b: int, n: int) -> Tensor:
    """The reward of target b on a batch of candidates for it (ClassLogProb needs the other targets' slots)."""
    fn = r.fn
    r.rows += x.shape[0]
    if isinstance(fn, ClassLogProb):
        lab = fn.labels[b].expand(x.shape[0])
        return torch.log_softmax(fn.guide(x.clamp(-1.0, 1.0)), dim=1)[torch.arange(x.shape[0]), lab]
    return fn(x)


# ------------------------------------------------------------------ metrics
def _mean_pairwise(x: Tensor) -> float:
    d = torch.cdist(x, x)
    n = x.shape[0]
    return float(d.sum() / max(n * (n - 1), 1))


def metrics(kind: str, s: Setup, x: Tensor, reward: Callable[[Tensor], Tensor]) -> dict[str, float]:
    with torch.no_grad():
        r = float(reward(x).mean())
        if kind == "logp":
            m = s.tb.evaluator(x, s.labels)
            return {"reward": r, "accuracy": m["accuracy"], "judge_logp": m["judge_logp"],
                    "diversity": m["diversity"], "fd": m["fd"], "fd_floor": m["fd_floor"]}
        ev = s.tb.evaluator
        xc = x.clamp(-1.0, 1.0)
        fd = T.frechet_distance(ev.features(xc), ev.test_features)
        div = _mean_pairwise(xc) / _mean_pairwise(ev.x_test)
        return {"reward": r, "diversity": div, "fd": fd, "fd_floor": ev.floor(len(x))}


def run_kind(kind: str, s: Setup, budgets: dict[str, tuple], log: Callable[[str], None]) -> list[Point]:
    points = []
    base_reward = ClassLogProb(s.tb.guide, s.labels) if kind == "logp" else ink
    for family, label, fn in methods(kind, s, budgets):
        counter = Counter(base_reward)
        t0 = time.perf_counter()
        try:
            x, nfe = fn(counter)
        except gk.NonFiniteError as exc:
            log(f"{kind}: {label}: diverged ({exc})")
            continue
        seconds = time.perf_counter() - t0
        p = Point(kind, family, label, x.detach(), float(nfe), counter.rows / s.n, seconds)
        p.metrics = metrics(kind, s, p.x, base_reward)
        log(f"{kind}: {label}: NFE {p.nfe:.0f}, reward {p.metrics['reward']:.3f} ({seconds:.1f} s)")
        points.append(p)
    return points


# ------------------------------------------------------------------ report
def _table(kind: str, pts: list[Point]) -> str:
    if kind == "logp":
        header = ["method", "NFE / sample", "reward calls / sample", "reward (guide log p)", "judge acc",
                  "judge log p", "diversity", "FD", "time (s)"]
        rows = [(p.label, p.nfe, p.reward_calls, p.metrics["reward"], p.metrics["accuracy"],
                 p.metrics["judge_logp"], p.metrics["diversity"], p.metrics["fd"], p.seconds) for p in pts]
    else:
        header = ["method", "NFE / sample", "reward calls / sample", "reward (ink fraction)", "diversity", "FD",
                  "time (s)"]
        rows = [(p.label, p.nfe, p.reward_calls, p.metrics["reward"], p.metrics["diversity"], p.metrics["fd"],
                 p.seconds) for p in pts]
    return markdown_table(header, rows)


def claim_runs(kind: str, s: Setup, budgets: dict[str, tuple], seeds: int) -> dict[str, list[dict[str, float]]]:
    """Best-of-N and FK steering rows again with ``seeds`` seeds (the claim is judged on their spread)."""
    runs: dict[str, list[dict[str, float]]] = {}
    base_reward = ClassLogProb(s.tb.guide, s.labels) if kind == "logp" else ink
    for k in range(seeds):
        sk = Setup(s.tb, s.labels, s.steps, s.seed + k, s.lam)
        for family, label, fn in methods(kind, sk, {**budgets, "lookahead": (), "dflow": (), "flowopt": (),
                                                    "spsa": (), "cmaes": ()}):
            if not (family.startswith("FK") or family == "best-of-N"):
                continue
            x, _ = fn(Counter(base_reward))
            runs.setdefault(label, []).append(metrics(kind, sk, x.detach(), base_reward))
    return runs


def fk_claim(runs: dict[str, list[dict[str, float]]], nfe: dict[str, float]) -> str:
    """The FK steering claim — fewer particles beat best-of-N at equal (or larger) compute — over several seeds:
    one row per potential and particle count, against best-of-N at the same NFE and with more NFE."""
    bon = {int(lab.split("=")[-1]): lab for lab in runs if lab.startswith("best-of-N")}
    acc = all("accuracy" in m for ms in runs.values() for m in ms)

    def stat(lab: str, key: str) -> tuple[float, float]:
        v = torch.tensor([m[key] for m in runs[lab]], dtype=torch.float64)
        return float(v.mean()), float(v.std()) / math.sqrt(len(v)) if len(v) > 1 else 0.0

    def verdict(f: str, b: str, key: str) -> str:
        (mf, sf), (mb, sb) = stat(f, key), stat(b, key)
        se = math.hypot(sf, sb)
        return "FK" if mf - mb > 2 * se else "BoN" if mb - mf > 2 * se else "tie"

    def cell(f: str, b: str) -> str:
        out = []
        for key, name in (("reward", "reward"), ("accuracy", "acc")) if acc else (("reward", "reward"),):
            (mf, sf), (mb, sb) = stat(f, key), stat(b, key)
            out.append(f"{name} {mf:.3g}±{sf:.2g} vs {mb:.3g}±{sb:.2g} **{verdict(f, b, key)}**")
        return "; ".join(out)

    rows = []
    for pot in ("diff", "max", "sum", "rt"):
        fk = {int(lab.split("=")[-1]): lab for lab in runs if lab.startswith(f"FK steering {pot} ")}
        for n_fk, f in sorted(fk.items()):
            same = cell(f, bon[n_fk]) if n_fk in bon else "–"
            more = "<br>".join(f"N={n_b}: {cell(f, b)}" for n_b, b in sorted(bon.items()) if n_b > n_fk) or "–"
            rows.append((f"FK {pot} N={n_fk}", f"{nfe.get(f, math.nan):.0f}", same, more))
    seeds = len(next(iter(runs.values()))) if runs else 0
    return (f"Mean ± standard error over {seeds} seeds (noise, SDE and resampling); **FK** / **BoN**: better by more "
            "than two standard errors, **tie** otherwise.\n\n" +
            markdown_table(["FK steering", "NFE", "vs best-of-N at equal NFE", "vs best-of-N with more NFE"], rows))


FAMILIES = ("baseline", "best-of-N", "FK diff", "FK max", "FK sum", "FK rt", "look-ahead",
            "classifier guidance (part 1)", "DPS (part 1)", "D-Flow", "FlowOpt-style", "noise search SPSA",
            "noise search CMA-ES")


def plot(path, results: dict[str, list[Point]]) -> None:
    plt = pyplot()
    if plt is None:
        return
    panels = [("logp", "reward", "guide log p(target) (reward)"), ("logp", "accuracy", "judge accuracy"),
              ("ink", "reward", "ink fraction (black-box reward)")]
    panels = [p for p in panels if p[0] in results]
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>pPX*hd"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (kind, key, title) in zip(axes[0], panels):
        for k, fam in enumerate(FAMILIES):
            pts = sorted((p for p in results[kind] if p.family == fam), key=lambda p: p.nfe)
            if not pts:
                continue
            style = "none" if fam == "baseline" else ("--" if fam.startswith("FK") and fam != "FK diff" else "-")
            ax.plot([p.nfe for p in pts], [p.metrics[key] for p in pts], linestyle=style, marker=markers[k],
                    color=cmap(k), label=fam, ms=5)
        ax.set_xscale("log")
        ax.set_xlabel("NFE per sample (log)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=7, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def _grid(path, results: dict[str, list[Point]], per: int) -> None:
    """One panel per method family at its largest budget: 4 samples of each target class (logp), 40 (ink)."""
    panels = []
    for kind, pts in results.items():
        best: dict[str, Point] = {}
        for p in pts:
            if p.family not in best or p.nfe > best[p.family].nfe:
                best[p.family] = p
        for p in best.values():
            if kind == "logp":   # rows are class-major: per samples of class 0, then class 1, ...
                idx = torch.cat([torch.arange(c * per, c * per + min(4, per)) for c in range(10)])
                panels.append((f"{kind}: {p.label}", p.x[idx]))
            else:
                panels.append((f"{kind}: {p.label}", p.x[:40]))
    T.save_grid(path, panels, nrow=10)


def run(args: argparse.Namespace) -> int:
    """``gradkit bench guide --part particles``.

    Args:
        args: the parsed ``bench guide`` arguments.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.tiny
    per_class = args.per_class or (1 if tiny else 10)
    steps = 4 if tiny else (args.steps if args.steps != 32 else 16)
    if tiny:
        budgets = {"bon": (2,), "fk": (2,), "lookahead": (2,), "dflow": (1,), "flowopt": (2,), "spsa": (1,),
                   "cmaes": (24,)}
    elif args.quick:
        budgets = {"bon": (4, 16), "fk": (4, 16), "lookahead": (4,), "dflow": (2,), "flowopt": (12,),
                   "spsa": (2,), "cmaes": (16,)}
    else:
        budgets = {"bon": (4, 16, 64), "fk": (4, 16), "lookahead": (4, 16), "dflow": (2, 8), "flowopt": (12, 60),
                   "spsa": (8,), "cmaes": (16, 64)}
    kinds = [k.strip() for k in args.rewards.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("logp", "ink")]
    if bad:
        print(f"unknown rewards {bad}; choose from logp, ink")
        return 2
    start = time.perf_counter()
    tb = T.load("tiny" if tiny else "full", cache=not args.no_cache)
    setup = time.perf_counter() - start
    labels = torch.arange(10).repeat_interleave(per_class)
    s = Setup(tb, labels, steps, args.seed, args.lam)
    results = {k: run_kind(k, s, budgets, print) for k in kinds}
    claims = {k: claim_runs(k, s, budgets, args.claim_seeds) for k in kinds}
    nfe = {p.label: p.nfe for pts in results.values() for p in pts}
    out = out_dir(args.out)
    head = (f"gradkit bench guide --part particles — {len(labels)} samples ({per_class} per target class), "
            f"{steps} steps (Euler; SDE for FK steering and look-ahead search); FK steering λ = {args.lam:g}, "
            f"its output = the best final particle; machine: {machine()}{load_note()}; "
            f"test-bed setup {setup:.1f} s. NFE = flow evaluations per output sample, a backward pass through a "
            f"step counting one more; reward calls = reward / classifier evaluations per output sample.")
    parts = [head]
    if "logp" in results:
        fl = results["logp"][0].metrics.get("fd_floor", math.nan)
        parts += [f"## Reward: guide log-probability of the target class\n\nFD floor (real vs real, same count): "
                  f"{fl:.2f}. Judge = a classifier trained on the other half of the data; it never steers.",
                  _table("logp", results["logp"]),
                  "### FK steering claim (fewer particles beat best-of-N at equal NFE)\n\n"
                  + fk_claim(claims["logp"], nfe)]
    if "ink" in results:
        parts += ["## Reward: ink in the top-left quadrant (non-differentiable, black box)",
                  _table("ink", results["ink"]),
                  "### FK steering claim on the black-box reward\n\n" + fk_claim(claims["ink"], nfe)]
    text = "\n\n".join(parts)
    print(text)
    write(out / "guide_particles.md", text)
    if not args.no_grids:
        plot(out / "guide_particles.png", results)
        _grid(out / "guide_particles_grid.png", results, per_class)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0
