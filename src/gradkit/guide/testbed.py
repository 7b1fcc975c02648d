"""Digits test-bed for guided sampling: a class-conditional flow-matching MLP, classifiers and metrics.

Everything runs on a CPU in seconds to a minute and is deterministic given the seeds:

- data: scikit-learn's 8×8 digits from :func:`gradkit.data.digits` (raw pixels / 16 mapped to [−1, 1];
  1,348 train / 449 test);
- :class:`DigitsFlow`: velocity model ``v_θ(x, t, y)`` on the linear path ``x_t = (1−t)·x0 + t·x1``
  (t = 0 noise, t = 1 data), input ``x ⊕ class embedding (11th class = "null" for classifier-free guidance)
  ⊕ sinusoidal time features`` → 3×256 SiLU → 64 (≈ 0.19 M parameters), trained with label dropout and the loss
  ``‖v_θ(x_t, t, y) − (x1 − x0)‖²``;
- a weaker flow (smaller, shorter training) for Autoguidance;
- a *guide* classifier (clean images) and a noise-aware guide classifier ``p_t(y | x_t)``, both trained on one
  half of the training split, and a *judge* classifier trained on the other half — the judge scores samples and
  never guides;
- :class:`Evaluator`: judge accuracy on the requested class, guide and judge log-probabilities (a gap exposes
  reward hacking), within-class diversity relative to real test digits, Fréchet distance on the judge's hidden
  features against real test digits with the real-vs-real floor, and the pixels' overshoot beyond [−1, 1].

Trained weights are cached under :func:`cache_dir` (``$GRADKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradkit``,
else ``~/.cache/gradkit``), one file per network keyed by a hash of its training configuration and the torch
version; a missing or unreadable file is retrained. :func:`load` builds (or loads) the whole test-bed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import digits

__all__ = [
    "NULL_CLASS", "ClassifierConfig", "DigitsFlow", "Evaluator", "FlowConfig", "NoisyClassifier", "Testbed",
    "cache_dir", "frechet_distance", "image_grid", "is_cached", "load", "save_grid", "train_classifier",
    "train_flow", "train_noisy_classifier", "with_steps",
]

NULL_CLASS = 10  # the "no condition" label of the flow's class embedding (classifier-free guidance)
# bump a part's number when its architecture or training loop changes: its old cache files are then ignored
_FORMAT = {"flow": 1, "weak_flow": 1, "guide": 1, "judge": 1, "noisy_guide": 2}


# -- networks --------------------------------------------------------------------------------------------
def _time_features(t: torch.Tensor, n: int) -> torch.Tensor:
    """``[sin(f_k t), cos(f_k t)]`` with ``n/2`` frequencies log-spaced from 1 to 1000 rad per unit time."""
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), n // 2, dtype=t.dtype, device=t.device))
    arg = t[:, None] * freqs
    return torch.cat([arg.sin(), arg.cos()], dim=1)


def _batch_time(t: Any, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.dim() == 0 else t.reshape(x.shape[0])


class DigitsFlow(nn.Module):
    """Class-conditional velocity model on 8×8 digits: ``forward(x, t, cond) -> v`` (``prediction="velocity"``).

    Args:
        width: hidden width (default 256).
        depth: number of hidden SiLU layers (default 3).
        emb_dim: class-embedding size (default 64); the embedding has ``n_classes + 1`` rows, the last being
            the null class :data:`NULL_CLASS` used for the unconditional prediction.
        time_dim: number of sinusoidal time features (default 32).
        n_classes: number of real classes (default 10).

    ``x``: ``[B, 64]``; ``t``: a float, a 0-d tensor or ``[B]`` in [0, 1]; ``cond``: ``None`` (unconditional), an
    int, or a ``[B]`` tensor of labels where :data:`NULL_CLASS` (or any negative label) means unconditional.
    """

    prediction = "velocity"

    def __init__(self, width: int = 256, depth: int = 3, emb_dim: int = 64, time_dim: int = 32,
                 n_classes: int = 10):
        super().__init__()
        self.n_classes, self.time_dim = n_classes, time_dim
        self.embed = nn.Embedding(n_classes + 1, emb_dim)
        sizes = [64 + emb_dim + time_dim] + [width] * depth
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        layers.append(nn.Linear(sizes[-1], 64))
        self.net = nn.Sequential(*layers)

    def labels(self, cond: Any, batch: int, device: torch.device) -> torch.Tensor:
        if cond is None:
            return torch.full((batch,), self.n_classes, dtype=torch.long, device=device)
        y = torch.as_tensor(cond, dtype=torch.long, device=device)
        y = y.expand(batch) if y.dim() == 0 else y.reshape(batch)
        return torch.where((y < 0) | (y >= self.n_classes), torch.full_like(y, self.n_classes), y)

    def forward(self, x: torch.Tensor, t: Any, cond: Any = None) -> torch.Tensor:
        tt = _batch_time(t, x)
        h = torch.cat([x, self.embed(self.labels(cond, x.shape[0], x.device)).to(x.dtype),
                       _time_features(tt, self.time_dim)], dim=1)
        return self.net(h)


class NoisyClassifier(nn.Module):
    """Noise-aware classifier ``logits = t·f(x_t, t)`` of the class of ``x1`` from a point ``x_t`` of the path.

    The factor t is the exact posterior's behaviour: at t = 0 the state is pure noise, independent of the class,
    and the logit differences of ``p_t(c|x)`` grow linearly in t (for Gaussian classes ``log p_t(c|x) = const +
    t·⟨x, μ_c⟩ + O(t²)``), so classifier guidance's velocity term ``((1−t)/t)·∇log p_t(c|x)`` stays bounded as
    t → 0. Without it a learned classifier's small spurious gradient at t ≈ 0 is multiplied by 1/t.

    Args:
        width: hidden width (default 256).
        depth: hidden SiLU layers (default 2; smooth activations give smooth input gradients).
        time_dim: sinusoidal time features (default 32).
        n_classes: classes (default 10).
    """

    def __init__(self, width: int = 256, depth: int = 2, time_dim: int = 32, n_classes: int = 10):
        super().__init__()
        self.time_dim = time_dim
        sizes = [64 + time_dim] + [width] * depth
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        layers.append(nn.Linear(sizes[-1], n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        tt = _batch_time(t, x)
        return tt[:, None] * self.net(torch.cat([x, _time_features(tt, self.time_dim)], dim=1))


def _classifier(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# -- training configurations ------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlowConfig:
    """How :func:`train_flow` trains a :class:`DigitsFlow` (AdamW, cosine decay to 0, t ~ U[0, 1]).

    Args:
        width: hidden width (default 256).
        depth: hidden layers (default 3).
        emb_dim: class-embedding size (default 64).
        time_dim: sinusoidal time features (default 32).
        steps: optimizer steps (default 6000).
        batch: batch size (default 256).
        lr: AdamW peak learning rate (default 2e-3), decayed to 0 by a cosine.
        weight_decay: AdamW decoupled weight decay (default 0).
        p_uncond: label dropout, the probability of training a row on the null class (default 0.1).
        seed: seed of the initialisation and of every random draw of the training (default 0).
    """

    width: int = 256
    depth: int = 3
    emb_dim: int = 64
    time_dim: int = 32
    steps: int = 6000
    batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    p_uncond: float = 0.1  # label dropout: probability of training on the null class
    seed: int = 0


@dataclass(frozen=True)
class ClassifierConfig:
    """How a clean or noise-aware classifier is trained: AdamW, cosine decay to 0, cross-entropy.

    Args:
        sizes: layer sizes of a clean classifier, ReLU between (default ``(64, 256, 128, 10)``; the last hidden
            layer gives the judge's features).
        width: hidden width of a noise-aware classifier (default 256).
        depth: hidden SiLU layers of a noise-aware classifier (default 2).
        steps: optimizer steps (default 2000).
        batch: batch size (default 128).
        lr: AdamW peak learning rate (default 1e-3).
        weight_decay: AdamW decoupled weight decay (default 1e-2).
        half: which half of the training split it learns from: 0 = the guide half, 1 = the judge half (default 0).
        input_noise: std of Gaussian noise added to clean training inputs (default 0: none).
        seed: seed of the initialisation and of the batches (default 0).
    """

    sizes: tuple[int, ...] = (64, 256, 128, 10)
    width: int = 256
    depth: int = 2
    steps: int = 2000
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-2
    half: int = 0
    input_noise: float = 0.0
    seed: int = 0


def _halves(n: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint halves of ``range(n)`` (guide half, judge half), fixed by ``seed``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2], perm[n // 2:]


def _fit(model: nn.Module, cfg: Any, n: int, batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
         callback: Callable[[int], None] | None) -> nn.Module:
    """AdamW with a cosine schedule for ``cfg.steps`` steps on batches of ``cfg.batch`` random rows of ``n``;
    ``batch_loss(rows, generator)`` draws the batch's noise from ``generator`` (seeded ``cfg.seed + 1``)."""
    steps = cfg.steps
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for step in range(steps):
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        loss = batch_loss(idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if callback is not None:
            callback(step)
    return model.eval().requires_grad_(False)


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def train_flow(cfg: FlowConfig, x: torch.Tensor, y: torch.Tensor, callback: Callable[[int], None] | None = None
               ) -> DigitsFlow:
    """Train a :class:`DigitsFlow` on ``(x, y)`` by conditional flow matching with label dropout.

    Loss ``‖v_θ(x_t, t, y) − (x1 − x0)‖²`` with ``x_t = (1−t)·x0 + t·x1``, ``x0 ~ N(0, I)``, ``t ~ U[0, 1]``; a row's
    label is replaced by :data:`NULL_CLASS` with probability ``cfg.p_uncond``.

    Args:
        cfg: the training configuration.
        x: images ``[n, 64]`` in [−1, 1].
        y: labels ``[n]``.
        callback: called with the step index after every step (e.g. a progress bar), default none.

    Returns:
        The trained model in eval mode with ``requires_grad`` off.
    """
    model = _seeded(cfg.seed, lambda: DigitsFlow(cfg.width, cfg.depth, cfg.emb_dim, cfg.time_dim))

    def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x1, yb = x[idx], y[idx].clone()
        yb[torch.rand(cfg.batch, generator=gen) < cfg.p_uncond] = NULL_CLASS
        x0 = torch.randn(x1.shape, generator=gen, dtype=x1.dtype)
        t = torch.rand(cfg.batch, generator=gen, dtype=x1.dtype)
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        return (model(xt, t, yb) - (x1 - x0)).square().sum(1).mean()

    return _fit(model, cfg, len(x), batch_loss, callback)


def train_classifier(cfg: ClassifierConfig, x: torch.Tensor, y: torch.Tensor,
                     callback: Callable[[int], None] | None = None) -> nn.Sequential:
    """Train a clean-image MLP classifier (ReLU) on ``(x, y)``.

    Args:
        cfg: the training configuration (``cfg.sizes``, ``cfg.input_noise`` …).
        x: images ``[n, 64]``.
        y: labels ``[n]``.
        callback: called with the step index after every step, default none.
    """
    model = _seeded(cfg.seed, lambda: _classifier(cfg.sizes))

    def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        xb = x[idx]
        if cfg.input_noise > 0:
            xb = xb + cfg.input_noise * torch.randn(xb.shape, generator=gen, dtype=xb.dtype)
        return F.cross_entropy(model(xb), y[idx])

    return _fit(model, cfg, len(x), batch_loss, callback)


def train_noisy_classifier(cfg: ClassifierConfig, x: torch.Tensor, y: torch.Tensor,
                           callback: Callable[[int], None] | None = None) -> NoisyClassifier:
    """Train :class:`NoisyClassifier` on ``x_t = (1−t)·x0 + t·x1``, ``t ~ U[0, 1]``, ``x0 ~ N(0, I)``.

    Args:
        cfg: the training configuration (``cfg.width``, ``cfg.depth`` …).
        x: clean images ``x1`` ``[n, 64]``.
        y: labels ``[n]``.
        callback: called with the step index after every step, default none.
    """
    model = _seeded(cfg.seed, lambda: NoisyClassifier(cfg.width, cfg.depth))

    def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x1 = x[idx]
        x0 = torch.randn(x1.shape, generator=gen, dtype=x1.dtype)
        t = torch.rand(cfg.batch, generator=gen, dtype=x1.dtype)
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        return F.cross_entropy(model(xt, t), y[idx])

    return _fit(model, cfg, len(x), batch_loss, callback)


# -- cache -----------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where trained test-bed weights live: ``$GRADKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradkit``, else
    ``~/.cache/gradkit``."""
    env = os.environ.get("GRADKIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gradkit"


def _key(kind: str, cfg: Any) -> str:
    blob = json.dumps({"kind": kind, "config": asdict(cfg), "torch": str(torch.__version__).split("+")[0],
                       "format": _FORMAT.get(kind, 1)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _path(kind: str, cfg: Any) -> Path:
    return cache_dir() / f"digits-{kind}-{_key(kind, cfg)}.pt"


def _cached(kind: str, cfg: Any, build: Callable[[], nn.Module], train: Callable[[], nn.Module], cache: bool,
            log: Callable[[str], None]) -> tuple[nn.Module, float]:
    """Load ``kind`` trained with ``cfg`` from the cache, or train it (and save it). Returns (model, train s)."""
    path = _path(kind, cfg)
    if cache and path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model = build()
            model.load_state_dict(blob["state_dict"])
            return model.eval().requires_grad_(False), 0.0
        except Exception as exc:  # a truncated or stale file: retrain
            why = (str(exc).strip().splitlines() or [""])[0][:120]
            log(f"cache file {path} unreadable ({type(exc).__name__}: {why}); retraining")
    start = time.perf_counter()
    model = train()
    seconds = time.perf_counter() - start
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"state_dict": model.state_dict(), "config": asdict(cfg), "seconds": seconds,
                        "torch": str(torch.__version__)}, tmp)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only home must not stop a benchmark
            log(f"could not write the cache file {path} ({exc}); continuing without caching")
    return model, seconds


# -- metrics ---------------------------------------------------------------------------------------------
def _stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = f.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (float64, symmetric eigen-decompositions):
    ``‖μa − μb‖² + tr(Σa + Σb − 2(Σa^½ Σb Σa^½)^½)``.

    Args:
        a: features ``[n, d]``.
        b: features ``[m, d]``.
    """
    (ma, ca), (mb, cb) = _stats(a), _stats(b)
    ev, vec = torch.linalg.eigh(ca)
    root = (vec * ev.clamp_min(0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(root @ cb @ root).clamp_min(0).sqrt().sum()
    return float((ma - mb).square().sum() + ca.trace() + cb.trace() - 2 * cross)


def _mean_pairwise(x: torch.Tensor) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    d = torch.cdist(x.double(), x.double())
    return float(d.sum() / (n * (n - 1)))


class Evaluator:
    """Scores generated digits against the real test split with the judge (which never guides).

    Args:
        judge: clean classifier ``nn.Sequential`` whose last hidden ReLU layer gives the features.
        guide: the classifier used for guidance (its log-probability is the "reward").
        x_test, y_test: real test digits in [−1, 1] and labels.
        x_ref: real digits not in the test split (the training split) for the real-vs-real Fréchet floor.
    """

    def __init__(self, judge: nn.Sequential, guide: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
                 x_ref: torch.Tensor):
        self.judge, self.guide = judge, guide
        self.x_test, self.y_test, self.x_ref = x_test, y_test, x_ref
        self.test_features = self.features(x_test)
        self.real_spread = {int(c): _mean_pairwise(x_test[y_test == c]) for c in y_test.unique()}
        self._floor: dict[int, float] = {}

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge[:-1](x.float())

    def floor(self, n: int) -> float:
        """Fréchet distance of ``n`` real training digits (or all of them) to the test digits: the floor."""
        n = min(n, len(self.x_ref))
        if n not in self._floor:
            idx = torch.randperm(len(self.x_ref), generator=torch.Generator().manual_seed(0))[:n]
            self._floor[n] = frechet_distance(self.features(self.x_ref[idx]), self.test_features)
        return self._floor[n]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Metrics of samples ``x`` ``[n, 64]`` generated for classes ``y`` ``[n]`` (pixels clamped to [−1, 1]).

        Keys: ``accuracy`` (judge argmax = requested class), ``judge_logp`` and ``reward`` (mean log-probability
        of the requested class under the judge and the guide classifier), ``diversity`` (mean over classes of the
        within-class mean pairwise distance divided by that of real test digits of the class), ``fd`` (Fréchet
        distance of judge features to the test digits), ``fd_floor`` (the same for real training digits, same
        count), ``overshoot`` (mean of ``max(|x| − 1, 0)`` over pixels before clamping: saturation; 0 for real
        digits).
        """
        x = x.detach().float()
        overshoot = float((x.abs() - 1.0).clamp_min(0.0).mean())
        xc = x.clamp(-1.0, 1.0)
        judge_logits = self.judge(xc)
        guide_logits = self.guide(xc)
        rows = torch.arange(len(y))
        spreads = [_mean_pairwise(xc[y == c]) / self.real_spread[int(c)] for c in y.unique()]
        spreads = [s for s in spreads if s == s]
        return {
            "accuracy": float((judge_logits.argmax(1) == y).float().mean()),
            "judge_logp": float(judge_logits.log_softmax(1)[rows, y].mean()),
            "reward": float(guide_logits.log_softmax(1)[rows, y].mean()),
            "diversity": sum(spreads) / len(spreads) if spreads else float("nan"),
            "fd": frechet_distance(self.features(xc), self.test_features),
            "fd_floor": self.floor(len(x)),
            "overshoot": overshoot,
        }


# -- pictures --------------------------------------------------------------------------------------------
def image_grid(x: torch.Tensor, nrow: int, pad: int = 1) -> torch.Tensor:
    """Tile digits into one ``[H, W]`` image in [0, 1] (white background, dark ink), row by row.

    Args:
        x: digits ``[n, 64]`` in [−1, 1] (clamped).
        nrow: number of rows of the grid.
        pad: white pixels between digits (default 1).
    """
    n = len(x)
    ncol = math.ceil(n / nrow)
    img = torch.ones(nrow * (8 + pad) + pad, ncol * (8 + pad) + pad)
    ink = 1.0 - (x.detach().float().clamp(-1, 1) + 1) / 2
    for i in range(n):
        r, c = divmod(i, ncol)
        img[pad + r * (8 + pad): pad + r * (8 + pad) + 8, pad + c * (8 + pad): pad + c * (8 + pad) + 8] = \
            ink[i].reshape(8, 8)
    return img


def save_grid(path: str | os.PathLike, panels: list[tuple[str, torch.Tensor]], nrow: int) -> Path | None:
    """Save one PNG with a titled grid of digits per panel; returns the path, or None without matplotlib.

    Args:
        path: the PNG file (its directory is created).
        panels: ``[(title, samples [n, 64])]``, drawn left to right, four per line.
        nrow: rows of each grid (see :func:`image_grid`).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, x) in zip(axes.flat, panels):
        ax.imshow(image_grid(x, nrow).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the whole test-bed ----------------------------------------------------------------------------------
FULL = {
    "flow": FlowConfig(),
    "weak_flow": FlowConfig(width=64, depth=2, steps=1000, seed=1),
    "guide": ClassifierConfig(half=0, steps=1000),
    "judge": ClassifierConfig(half=1, steps=1000, seed=1),
    "noisy_guide": ClassifierConfig(half=0, steps=3000, seed=2),
}
TINY = {
    "flow": FlowConfig(width=32, depth=2, emb_dim=8, time_dim=8, steps=30, batch=64),
    "weak_flow": FlowConfig(width=16, depth=1, emb_dim=8, time_dim=8, steps=10, batch=64, seed=1),
    "guide": ClassifierConfig(sizes=(64, 32, 10), steps=60, half=0),
    "judge": ClassifierConfig(sizes=(64, 32, 16, 10), steps=60, half=1, seed=1),
    "noisy_guide": ClassifierConfig(width=32, depth=1, steps=30, half=0, seed=2),
}


def is_cached(budget: str = "full") -> bool:
    """Whether every network of the test-bed at ``budget`` is in :func:`cache_dir` (then :func:`load` trains nothing).

    Args:
        budget: ``"full"`` or ``"tiny"``.
    """
    configs = FULL if budget == "full" else TINY
    return all(_path(kind, cfg).exists() for kind, cfg in configs.items())


@dataclass
class Testbed:
    """The digits test-bed: models, classifiers, data and the :class:`Evaluator` (built by :func:`load`).

    Args:
        flow: the class-conditional velocity model.
        weak_flow: a smaller, shorter-trained flow (Autoguidance's "bad" model).
        guide: clean guide classifier ``logits = guide(x)`` (guide half of the training split).
        noisy_guide: noise-aware guide classifier ``logits = noisy_guide(x_t, t)`` (guide half).
        judge: clean judge classifier (the other half; it scores samples and never guides).
        data: ``(x_train, y_train, x_test, y_test)`` from :func:`gradkit.data.digits`.
        evaluator: metrics of generated samples.
        configs: the training configuration of each part.
        train_seconds: seconds spent training each part in this call (0 when loaded from the cache).
    """

    flow: DigitsFlow
    weak_flow: DigitsFlow
    guide: nn.Sequential
    noisy_guide: NoisyClassifier
    judge: nn.Sequential
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    evaluator: Evaluator
    configs: dict[str, Any]
    train_seconds: dict[str, float] = field(default_factory=dict)


def load(budget: str = "full", *, cache: bool = True, log: Callable[[str], None] = print,
         train_threads: int | None = 1, **overrides: Any) -> Testbed:
    """Build the digits test-bed, loading each network from the cache or training it (and caching it).

    Args:
        budget: ``"full"`` (the benchmark models; about a minute to train on 2 cores the first time) or ``"tiny"``
            (seconds; for tests and smoke runs — the samples are blobs).
        cache: read and write :func:`cache_dir` (default True); False always trains and writes nothing.
        log: where progress lines go (default ``print``).
        train_threads: torch intra-op threads while training (default 1: these small MLPs gain little from more,
            and one thread makes the trained weights the same on machines with different core counts);
            ``None`` keeps the current setting.
        overrides: replace a configuration, e.g. ``flow=FlowConfig(steps=2000)``.
    """
    if budget not in ("full", "tiny"):
        raise ValueError(f"budget must be 'full' or 'tiny', got {budget!r}")
    configs = {**(FULL if budget == "full" else TINY), **overrides}
    unknown = set(overrides) - set(FULL)
    if unknown:
        raise ValueError(f"unknown test-bed parts {sorted(unknown)}; parts: {sorted(FULL)}")
    x_train, y_train, x_test, y_test = data = digits()
    halves = _halves(len(x_train))
    seconds: dict[str, float] = {}

    def part(kind: str, build, train):
        cfg = configs[kind]
        model, secs = _cached(kind, cfg, build, lambda: _with_threads(train_threads, train), cache, log)
        if secs:
            log(f"trained the test-bed's {kind} in {secs:.1f} s")
        seconds[kind] = secs
        return model

    def flow(kind: str) -> DigitsFlow:
        cfg = configs[kind]
        return part(kind, lambda: DigitsFlow(cfg.width, cfg.depth, cfg.emb_dim, cfg.time_dim),
                    lambda: train_flow(cfg, x_train, y_train))

    def clean(kind: str) -> nn.Sequential:
        cfg = configs[kind]
        h = halves[cfg.half]
        return part(kind, lambda: _classifier(cfg.sizes), lambda: train_classifier(cfg, x_train[h], y_train[h]))

    cfg_noisy = configs["noisy_guide"]
    h = halves[cfg_noisy.half]
    noisy = part("noisy_guide", lambda: NoisyClassifier(cfg_noisy.width, cfg_noisy.depth),
                 lambda: train_noisy_classifier(cfg_noisy, x_train[h], y_train[h]))
    guide, judge = clean("guide"), clean("judge")
    if configs["guide"].half == configs["judge"].half:
        raise ValueError("the guide and the judge must be trained on different halves of the training split")
    tb = Testbed(flow("flow"), flow("weak_flow"), guide, noisy, judge, data,
                 Evaluator(judge, guide, x_test, y_test, x_train), configs, seconds)
    return tb


def _with_threads(n: int | None, fn: Callable[[], nn.Module]) -> nn.Module:
    if n is None:
        return fn()
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def with_steps(cfg: FlowConfig, steps: int) -> FlowConfig:
    """``cfg`` with another step budget.

    Args:
        cfg: a flow configuration.
        steps: the new number of optimizer steps.
    """
    return replace(cfg, steps=steps)
