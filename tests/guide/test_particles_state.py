"""Every population method: state_dict round trip mid-run, deepcopy and pickle of the sampler and of its state, and a
resumed run equal to a straight one (bit for bit); the input optimisers survive copies too."""

import copy
import functools
import pickle

import pytest
import torch

import gradkit.guide as G

from .helpers import noise

f64 = torch.float64
RING = G.toy.ring(6, classes="parity")
A = torch.tensor([0.8, -0.3], dtype=f64)


def _reward(x):
    return x @ A


def _kernel(gmm, x, t, t_next, cond, generator):
    return gmm.ancestral(x, [t, t_next], cond, generator=generator)


CASES = {
    "BestOfN": (lambda: G.BestOfN(_reward, 4, mode="soft", seed=2), "sde"),
    "FKSteering": (lambda: G.FKSteering(_reward, 2.0, potential="max", n_particles=4, seed=1), "sde"),
    "FKSteering-reference": (lambda: G.FKSteering(_reward, 2.0, reference=True, adaptive=False, seed=1), "sde"),
    "FKSteering-exact": (lambda: G.FKSteering(_reward, 2.0, potential="diff", adaptive=False,
                                              proposal=functools.partial(_kernel, RING)), "euler"),
    "FKCorrector": (lambda: G.FKCorrector(2.5, adaptive=False, seed=3), "sde"),
    "LookAheadSearch": (lambda: G.LookAheadSearch(_reward, 3, select="softmax", seed=4), "sde"),
    "Free2Guide": (lambda: G.Free2Guide(_reward, 3, guided_steps=3), "sde"),
    "CoDe": (lambda: G.CoDe(_reward, 3, block=3), "sde"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_deepcopy_pickle(name):
    make, method = CASES[name]
    x, cond = noise(8, 2, 3), torch.tensor([0, 1] * 4)
    mk = lambda: G.Sampler(RING, guidance=make(), steps=9, method=method, seed=5)  # noqa: E731
    ref = mk()
    straight = ref.run(x, cond).x
    s = mk()
    s.start(x, cond)
    for _ in range(4):                    # mid-block for CoDe (a queued state), after resamplings for FK
        s.step()
    state = s.state_dict()
    state2 = pickle.loads(pickle.dumps(copy.deepcopy(state)))
    r = mk()
    r.load_state_dict(state2)
    assert torch.equal(r.run().x, straight)
    assert torch.equal(pickle.loads(pickle.dumps(s)).run().x, straight)
    assert torch.equal(copy.deepcopy(s).run().x, straight)
    out = s.run()
    assert torch.equal(out.x, straight)
    assert out.nfe == ref.counter.nfe      # the velocity cache survives the copies: the same NFE bill
    g1, g2 = ref.guidance.state_dict(), s.guidance.state_dict()
    for k in ("log_weights", "rewards", "chosen", "lineage"):
        if k in g1:
            assert torch.equal(g1[k], g2[k]), k


def test_input_optimisers_survive_copies():
    g = G.toy.gaussian([1.0, -2.0], [1.2, 0.9])
    y = torch.tensor([[0.3, 0.7]], dtype=f64)
    for method in (G.DFlow(functools.partial(_sq, y=y), steps=4, iters=3),
                   G.FlowOpt(y, steps=6, n_max=2, iters=3, check="off"),
                   G.NoiseSearch(functools.partial(_sq, y=y), steps=4)):
        twin = pickle.loads(pickle.dumps(copy.deepcopy(method)))
        if isinstance(method, G.NoiseSearch):
            a = method.search(g, torch.zeros(1, 2, dtype=f64), budget=60, seed=0).x0
            b = twin.search(g, torch.zeros(1, 2, dtype=f64), budget=60, seed=0).x0
        elif isinstance(method, G.FlowOpt):
            a, b = method.run(g).x0, twin.run(g).x0
        else:
            a, b = method.run(g, torch.zeros(1, 2, dtype=f64)).x0, twin.run(g, torch.zeros(1, 2, dtype=f64)).x0
        assert torch.equal(a, b)


def _sq(x, y):
    return 0.5 * ((x - y) ** 2).sum(1)
