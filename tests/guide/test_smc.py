"""SMC machinery of the population methods: ESS, resampling schemes, the potential / resampling schedule and the
adaptive threshold (all exact), and parity of the reference modes with the authors' procedures re-typed here."""

import math

import pytest
import torch

import gradkit.guide as G
from gradkit.errors import NonFiniteError
from gradkit.guide import _convert as C

from .helpers import noise

f64 = torch.float64


# ------------------------------------------------------------------ ESS and resampling
def test_effective_sample_size_exact_values():
    assert float(G.effective_sample_size(torch.zeros(8, dtype=f64))) == pytest.approx(8.0, abs=1e-12)
    lw = torch.log(torch.tensor([0.5, 0.25, 0.25], dtype=f64)) + 3.7    # shift-invariant
    assert float(G.effective_sample_size(lw)) == pytest.approx(1 / (0.25 + 0.0625 + 0.0625), abs=1e-12)
    one = torch.tensor([0.0, -math.inf, -math.inf, -math.inf], dtype=f64)
    assert float(G.effective_sample_size(one)) == pytest.approx(1.0, abs=1e-12)
    batch = torch.stack([torch.zeros(4, dtype=f64), one])
    assert torch.allclose(G.effective_sample_size(batch), torch.tensor([4.0, 1.0], dtype=f64))


def test_systematic_resampling_copies_are_floor_or_ceil_of_n_w():
    w = torch.tensor([0.37, 0.0, 0.21, 0.05, 0.37, 0.0], dtype=f64)
    lw = torch.log(w)
    N = w.numel()
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = G.resample(lw, "systematic", generator=gen)
        counts = torch.bincount(idx, minlength=N).to(f64)
        assert bool((counts >= torch.floor(N * w)).all()) and bool((counts <= torch.ceil(N * w)).all()), counts
        assert counts[1] == 0 and counts[5] == 0   # zero weights (one trailing) are never chosen


def test_multinomial_resampling_frequencies():
    w = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=f64)
    idx = G.resample(torch.log(w).expand(4000, 4), "multinomial", generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(idx.flatten(), minlength=4).to(f64) / idx.numel()
    n = idx.numel()
    assert torch.all((freq - w).abs() <= 5 * torch.sqrt(w * (1 - w) / n) + 1e-12), freq
    assert freq[3] == 0


def test_resample_rejects_degenerate_weights():
    with pytest.raises(NonFiniteError, match="every log-weight"):
        G.resample(torch.full((3,), -math.inf, dtype=f64))
    with pytest.raises(NonFiniteError, match="NaN"):
        G.resample(torch.tensor([0.0, math.nan], dtype=f64))
    with pytest.raises(ValueError, match="method"):
        G.resample(torch.zeros(3, dtype=f64), "residual")


# ------------------------------------------------------------------ schedule and adaptive threshold
class _Still:
    """A model with zero velocity: x̂1 = x at every t, so each row's reward is fixed."""

    prediction = "velocity"

    def __call__(self, x, t, cond=None):
        return torch.zeros_like(x)


def _identity(x, t, tn, cond, gen):
    return x


def test_potential_schedule_and_forced_resampling_steps():
    calls = []

    def reward(x):
        calls.append(x.shape[0])
        return x[:, 0]

    fk = G.FKSteering(reward, 0.1, potential="rt", resample_every=3, resample_start=2, resample_end=8, adaptive=False,
                      proposal=_identity)
    assert fk.potential_steps(12) == [2, 5, 8, 11]
    x0 = torch.linspace(-1, 1, 6, dtype=f64)[:, None]
    G.sample(_Still(), x0, guidance=fk, steps=12)
    assert len(calls) == 4
    assert [s for s, _ in fk.ancestry] == [2, 5, 8, 11]
    assert [s for s, _ in fk.ess_history] == [2, 5, 8, 11]


def test_adaptive_threshold_resamples_exactly_when_ess_falls_below():
    # rows' rewards are fixed (zero velocity, identity proposal); with the rt potential the log-weights after the
    # k-th potential are k·λ·r until a resampling, so the first resampling step is known in closed form
    r = torch.linspace(-1, 1, 8, dtype=f64)
    lam, thr = 0.4, 0.5
    expect = None
    for k in range(1, 20):
        if float(G.effective_sample_size(k * lam * r)) < thr * 8:
            expect = k - 1           # the k-th potential step is step k − 1
            break
    fk = G.FKSteering(lambda x: x[:, 0], lam, potential="rt", ess_threshold=thr, proposal=_identity,
                      final_resample=False)
    G.sample(_Still(), r[:, None].clone(), guidance=fk, steps=12)
    assert expect is not None and fk.ancestry and fk.ancestry[0][0] == expect
    ess = dict(fk.ess_history)
    assert all(float(ess[s]) >= thr * 8 for s in range(expect))
    # constant reward: equal weights, never resampled (the last step resamples only on request)
    fk = G.FKSteering(lambda x: torch.zeros(x.shape[0], dtype=x.dtype), 3.0, proposal=_identity,
                      final_resample=False)
    G.sample(_Still(), r[:, None].clone(), guidance=fk, steps=6)
    assert fk.ancestry == []


def test_groups_resample_independently_and_lineage_composes():
    # group 0 has spread rewards (collapses), group 1 constant rewards (never resampled)
    x0 = torch.cat([torch.linspace(-3, 3, 4, dtype=f64), torch.zeros(4, dtype=f64)])[:, None]
    fk = G.FKSteering(lambda x: x[:, 0], 2.0, potential="rt", n_particles=4, proposal=_identity, seed=3)
    cond = torch.arange(8) % 3
    s = G.Sampler(_Still(), guidance=fk, steps=5)
    out = s.run(x0, cond).x
    assert torch.equal(s.cond, cond[fk.lineage])          # a per-row condition follows its particle
    for _, anc in fk.ancestry:
        assert bool((anc[:4] < 4).all()) and torch.equal(anc[4:], torch.arange(4, 8))
    lineage = torch.arange(8)
    for _, anc in fk.ancestry:
        lineage = lineage[anc]
    assert torch.equal(lineage, fk.lineage)
    assert torch.equal(out[:, 0], x0[fk.lineage, 0])    # identity proposal: each row is its initial ancestor


# ------------------------------------------------------------------ reference parity: the authors' FKD.resample
class _AuthorsFKD:
    """The authors' FKD.resample procedure (zacharyhorvitz/Fk-Diffusion-Steering, fkd_class.py), re-typed for one
    population, with the multinomial draw on a given generator."""

    def __init__(self, potential, lam, n, adaptive, every, t_start, t_end, steps, reward, gen, r_min=0.0):
        self.p, self.lam, self.n, self.adaptive = potential, lam, n, adaptive
        self.interval = set(range(t_start, t_end + 1, every)) | {steps - 1}
        self.steps, self.reward, self.gen = steps, reward, gen
        self.rs = torch.full((n,), r_min, dtype=f64)
        self.prod = torch.ones(n, dtype=f64)

    def resample(self, i, latents, x0_preds):
        if i not in self.interval:
            return latents
        r = self.reward(x0_preds)
        if self.p == "max":
            cand = torch.maximum(r, self.rs)
            w = torch.exp(self.lam * cand)
        elif self.p == "sum":
            cand = r + self.rs
            w = torch.exp(self.lam * cand)
        elif self.p == "diff":
            cand = r
            w = torch.exp(self.lam * (r - self.rs))
        else:
            cand = r
            w = torch.exp(self.lam * r)
        if i == self.steps - 1 and self.p != "diff":
            w = torch.exp(self.lam * cand) / self.prod
        w = torch.clamp(w, 0, 1e10)
        w[torch.isnan(w)] = 0.0
        if self.adaptive or i == self.steps - 1:
            nw = w / w.sum()
            if 1.0 / nw.pow(2).sum() >= 0.5 * self.n:
                self.rs = cand
                return latents
        idx = torch.multinomial(w, self.n, replacement=True, generator=self.gen)
        self.rs = cand[idx]
        self.prod = self.prod[idx] * w[idx]
        return latents[idx]


@pytest.mark.parametrize("potential,adaptive", [("max", False), ("diff", True), ("sum", False), ("rt", True)])
def test_reference_mode_matches_the_authors_procedure(potential, adaptive):
    gmm = G.toy.ring(4, radius=2.0, std=0.5)
    a = torch.tensor([0.7, -0.4], dtype=f64)

    def reward(x):
        return x @ a

    steps, N, seed, rs_seed, lam = 12, 8, 5, 9, 4.0
    x0 = noise(N, 2, 4)
    fk = G.FKSteering(reward, lam, potential=potential, reference=True, resampling="multinomial", adaptive=adaptive,
                      resample_every=3, resample_start=1, resample_end=9, seed=rs_seed)
    ours = G.sample(gmm, x0, guidance=fk, steps=steps, method="sde", seed=seed)
    # the authors' loop on the same SDE (same noise stream) with their resample after every step
    ref = _AuthorsFKD(potential, lam, N, adaptive, 3, 1, 9, steps, reward, torch.Generator().manual_seed(rs_seed))
    gen = torch.Generator().manual_seed(seed)
    times = G.time_grid(steps)
    x = x0.clone()
    for i in range(steps):
        t0, t1 = float(times[i]), float(times[i + 1])
        h = t1 - t0
        v = gmm(x, torch.full((N,), t0, dtype=f64))
        x1_pred = x + (1 - t0) * v
        g = 1.0 * (1 - t0)
        drift = v + 0.5 * g * g * C.score_from_v(x, v, t0)
        x = x + h * drift + (g * abs(h) ** 0.5) * torch.randn(x.shape, generator=gen, dtype=f64)
        x = ref.resample(i, x, x1_pred)
    assert fk.ancestry, "the comparison must cover at least one resampling"
    assert torch.equal(ours, x)


def test_fkc_reference_systematic_matches_the_authors_rule():
    # their sample_cat_sys: clip(softmax, 1e-6, 1), positions (u + j/N) mod 1, np.digitize(right=True), N → N−1
    import numpy as np

    logits = torch.tensor([0.3, -2.0, 1.1, -30.0, 0.0], dtype=f64)
    ids = G.fk_correctors.reference_systematic(logits, torch.Generator().manual_seed(2))
    u = torch.rand((1,), dtype=f64, generator=torch.Generator().manual_seed(2))
    u = (u + torch.arange(5, dtype=f64) / 5) % 1.0
    bins = torch.cumsum(torch.clip(torch.softmax(logits, -1), 1e-6, 1.0), -1)
    want = np.digitize(u.numpy(), bins.numpy(), right=True)
    want[want == 5] = 4
    assert ids.tolist() == want.tolist()
