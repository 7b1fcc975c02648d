"""Look-ahead search (Free²Guide / CoDe): exact reductions and accounting — one candidate is plain SDE sampling bit
for bit, λ → 0 softmax is argmax, the NFE bill is 1 + R per guided step (block 1) — and the search raises the
reward it is given."""

import math

import pytest
import torch

import gradkit.guide as G
from gradkit.errors import NonFiniteError

from .helpers import noise

f64 = torch.float64
RING = G.toy.ring(8, radius=3.0, std=0.4)
A = torch.tensor([1.0, 0.4], dtype=f64)


def linear(x):
    return x @ A


def test_one_candidate_is_plain_sde_sampling_bit_for_bit():
    x0 = noise(10, 2, 1)
    plain = G.sample(RING, x0, steps=12, method="sde", seed=3)
    la = G.LookAheadSearch(linear, 1)
    assert torch.equal(G.sample(RING, x0, guidance=la, steps=12, method="sde", seed=3), plain)
    assert len(la.decisions) == 12


def test_nfe_bill_block_one():
    # per guided step: 1 velocity shared by the R copies + R look-aheads, one of which the next step reuses
    R, steps, guided = 5, 10, 4
    out = G.sample(RING, noise(6, 2, 2), guidance=G.LookAheadSearch(linear, R, stop=guided), steps=steps,
                   method="sde", full_output=True)
    assert out.nfe == steps + guided * R - guided + (1 if guided == steps else 0)


def test_zero_temperature_softmax_equals_argmax():
    x0 = noise(8, 2, 4)
    hard = G.sample(RING, x0, guidance=G.LookAheadSearch(linear, 6), steps=10, method="sde", seed=1)
    soft = G.sample(RING, x0, guidance=G.LookAheadSearch(linear, 6, select="softmax", temperature=1e-9), steps=10,
                    method="sde", seed=1)
    assert torch.equal(hard, soft)


def test_search_raises_the_reward_monotonically_in_r():
    x0 = noise(400, 2, 5)
    means = []
    for R in (1, 4, 16):
        x = G.sample(RING, x0, guidance=G.LookAheadSearch(linear, R), steps=10, method="sde", seed=2)
        means.append(float(linear(x).mean()))
    assert means[0] < means[1] < means[2], means
    assert means[2] - means[0] > 1.0


def test_blocks_on_uniform_and_explicit_grids():
    la = G.CoDe(linear, 4, block=3)
    out = la.run(RING, noise(4, 2, 6), steps=9, seed=1)
    assert [s for s, _, _ in la.decisions] == [0, 3, 6]
    # per block: 1 shared + R·(B − 1) candidate evaluations + R look-aheads (the last block ends at t = 1: none),
    # minus the look-ahead the next block reuses
    R, B = 4, 3
    assert out.nfe == 3 * (1 + R * (B - 1)) + 2 * R - 2
    # the same through gk.guide.sample (uniform grid assumed and checked) — the same result
    again = G.sample(RING, noise(4, 2, 6), guidance=G.CoDe(linear, 4, block=3), steps=9, method="sde", seed=1)
    assert torch.equal(again, out.x)
    times = torch.tensor([0.0, 0.1, 0.3, 0.6, 0.8, 0.9, 1.0], dtype=f64)
    with pytest.raises(RuntimeError, match="not uniform"):
        G.sample(RING, noise(4, 2), guidance=G.CoDe(linear, 2, block=3), times=times, method="sde")
    assert G.CoDe(linear, 2, block=3).run(RING, noise(4, 2), times=times).x.shape == (4, 2)


def test_free2guide_presets_and_fresh_initial_noises():
    f2g = G.Free2Guide(linear, 4, guided_steps=2)
    out = f2g.run(RING, noise(6, 2, 7), steps=10, seed=2)
    assert [s for s, _, _ in f2g.decisions] == [0, 1]
    # step 0: 4 candidates evaluated each (fresh noises do not share a velocity) + 4 look-aheads
    assert out.nfe == 10 + (4 + 4 - 1 - 1) + (4 - 1)


def test_nonfinite_candidates():
    def bad(x):
        r = linear(x)
        r[::3] = math.nan
        return r

    with pytest.raises(NonFiniteError):
        G.sample(RING, noise(4, 2), guidance=G.LookAheadSearch(bad, 3), steps=3, method="sde")
    la = G.LookAheadSearch(bad, 3, on_nonfinite="worst")
    G.sample(RING, noise(4, 2), guidance=la, steps=3, method="sde")
    for _, pick, r in la.decisions:
        assert bool(torch.isfinite(r.gather(1, pick[:, None])).all())
    with pytest.raises(ValueError, match="select"):
        G.LookAheadSearch(linear, 3, select="max")
    with pytest.raises(ValueError, match="temperature"):
        G.LookAheadSearch(linear, 3, select="softmax", temperature=0.0)
