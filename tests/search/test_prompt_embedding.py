"""PromptEmbedding (BBT / BBTv2): the prompt enters where and how it should, populations in one forward equal
the per-candidate loop, the projections follow BBT's and BBTv2's distributions, a search raises a frozen model's
fit, state and copies."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradkit as gk
from gradkit.search.spaces import PromptEmbedding


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


class _Seq(nn.Module):
    """A tiny sequence model: embedding -> mean over positions of a per-token MLP -> logits."""

    def __init__(self, vocab=11, width=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(vocab, width)
        self.block = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, 3)

    def forward(self, ids):
        h = self.block(self.tok(ids))
        return self.head(h.mean(1))


def test_input_side_additive_prompt_on_a_flat_model():
    model = _mlp()
    x = torch.randn(4, 6)
    space = PromptEmbedding(model, (6,), 3, mode="add", where="input", projection="uniform", seed=1)
    z = torch.tensor([0.5, -1.0, 2.0])
    space.set(z)
    a = space.projections()[0]
    assert a.shape == (6, 3) and float(a.abs().max()) <= 1 / math.sqrt(3)
    space.remove()
    want = model(x + a @ z)
    space2 = PromptEmbedding(model, (6,), 3, mode="add", where="input", projection="uniform", seed=1)
    space2.set(z)
    torch.testing.assert_close(model(x), want)
    space2.remove()
    torch.testing.assert_close(model(x), model[2](model[1](model[0](x))))


def test_prepended_soft_tokens_and_deep_prompts_replace_the_prompt_positions():
    model = _Seq()
    ids = torch.randint(0, 11, (2, 4))
    seen = {}
    model.block.register_forward_hook(lambda m, i, o: seen.__setitem__("block_in", i[0]))
    space = PromptEmbedding([model.tok, model.block], (2, 5), 4, mode="prepend", projection="uniform", seed=0,
                            where="output")
    # site 0: the embedding's output gets 2 soft tokens in front; site 1 (the block's output): its first 2
    # positions are replaced by the second prompt
    z = torch.arange(8.0) / 8
    space.set(z)
    out = model(ids)
    assert seen["block_in"].shape == (2, 6, 5)
    torch.testing.assert_close(seen["block_in"][:, :2], space.prompt(0).expand(2, 2, 5))
    torch.testing.assert_close(seen["block_in"][:, 2:], model.tok.weight[ids])
    h = model.block[1](model.block[0](seen["block_in"]))
    h = torch.cat([space.prompt(1).expand(2, 2, 5), h[:, 2:]], 1)
    torch.testing.assert_close(out, model.head(h.mean(1)))


def test_additive_prompt_on_the_first_positions_of_a_sequence():
    model = _Seq()
    ids = torch.randint(0, 11, (3, 4))
    space = PromptEmbedding(model.tok, (2, 5), 4, mode="add", projection="uniform")
    space.set(torch.ones(4))
    seen = {}
    model.block.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0]))
    model(ids)
    emb = model.tok.weight[ids]
    torch.testing.assert_close(seen["x"][:, :2], emb[:, :2] + space.prompt(0))
    torch.testing.assert_close(seen["x"][:, 2:], emb[:, 2:])


@pytest.mark.parametrize("mode", ["prepend", "add"])
def test_population_in_one_forward_equals_the_loop(mode):
    model = _Seq()
    ids = torch.randint(0, 11, (3, 4))
    space = PromptEmbedding([model.tok, model.block], (2, 5), 4, mode=mode, seed=2)
    model(ids)  # measures σ̂ for the normal projections
    cand = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with space.population(cand):
            batched = model(ids.repeat(5, 1)).view(5, 3, 3)
        for k in range(5):
            with space.at(cand[k]):
                torch.testing.assert_close(batched[k], model(ids), rtol=1e-5, atol=1e-6)
        # one site at a time (BBTv2): the other site stays at its current z
        space.set(torch.full((8,), 0.3))
        with space.population(cand[:, :4], site=1):
            one = model(ids.repeat(5, 1)).view(5, 3, 3)
        for k in range(5):
            with space.at(cand[k, :4], site=1):
                torch.testing.assert_close(one[k], model(ids), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(space.get(), torch.full((8,), 0.3))


def test_normal_projection_scale_follows_bbtv2():
    model = _mlp()
    x = torch.randn(64, 6) * 3.0
    x[0, 0] = 1e4  # an outlier: σ̂ is measured with 3-sigma clipping
    d = 16
    space = PromptEmbedding(model, (6,), d, mode="add", where="input", sigma=0.5, alpha=2.0)
    assert space.projections() == [None]
    model(x)
    sd = space.std[0]
    assert 2.0 < sd < 4.5  # the raw std is ~ 1250 because of the outlier
    a = space.projections()[0]
    want = 2.0 * sd / (math.sqrt(d) * 0.5)
    assert abs(float(a.std()) / want - 1) < 0.35  # 96 draws
    big = PromptEmbedding(nn.Linear(400, 2), (400,), 50, mode="add", where="input", std=1.5, sigma=2.0)
    assert abs(float(big.projections()[0].std()) / (1.5 / (math.sqrt(50) * 2.0)) - 1) < 0.03


def test_backprop_through_the_same_prompt():
    model = _mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    space = PromptEmbedding(model, (6,), 4, mode="add", where="input", std=1.0)
    space.vector.requires_grad_()
    opt = torch.optim.Adam([space.vector], lr=0.1)
    first = float(F.cross_entropy(model(x), y).detach())
    for _ in range(50):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first - 0.05
    # identity projection: z is the full prompt
    full = PromptEmbedding(model, (6,), 6, mode="add", where="input", projection="identity")
    full.set(torch.arange(6.0))
    torch.testing.assert_close(full.prompt(0), torch.arange(6.0))


def test_cmaes_over_z_undoes_an_input_shift_of_a_frozen_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[2].weight.mul_(20.0)  # a confident classifier: its cross-entropy tracks its agreement
    x = torch.randn(200, 6)
    with torch.no_grad():
        y = model(x).argmax(1)
    shift = torch.tensor([2.0, -1.5, 1.0, 0.5, -2.0, 1.0])
    xs = x + shift  # the deployment inputs are shifted: the frozen model loses accuracy
    base = float((model(xs).argmax(1) == y).float().mean())
    space = PromptEmbedding(model, (6,), 6, mode="add", where="input", std=1.0, seed=0)
    es = gk.search.CMAES(space.x0, 1.0, popsize=12, seed=0)

    def fitness(cand):
        with torch.no_grad(), space.population(cand):
            logits = model(xs.repeat(cand.shape[0], 1)).view(cand.shape[0], 200, 3)
        return torch.stack([F.cross_entropy(lg, y) for lg in logits]).double()

    for _ in range(40):  # 480 forward passes
        cand = es.ask()
        es.tell(cand, fitness(cand))
    space.set(es.best[0])
    with torch.no_grad():
        acc = float((model(xs).argmax(1) == y).float().mean())
    assert base < 0.85 and acc > 0.9 and acc > base + 0.1


def test_state_dict_round_trip_and_copies():
    model = _Seq()
    ids = torch.randint(0, 11, (2, 4))
    space = PromptEmbedding([model.tok, model.block], (2, 5), 3, mode="prepend", seed=4)
    model(ids)
    space.set(torch.randn(6, generator=torch.Generator().manual_seed(1)))
    out = model(ids)
    state = copy.deepcopy(space.state_dict())
    model2 = _Seq()
    space2 = PromptEmbedding([model2.tok, model2.block], (2, 5), 3, mode="prepend", seed=0)
    space2.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(space.projections(), space2.projections()))
    torch.testing.assert_close(model2(ids), out, rtol=0, atol=0)
    for twin in (copy.deepcopy((model, space)), pickle.loads(pickle.dumps((model, space)))):
        m, s = twin
        assert torch.equal(m(ids), out)
        s.set(torch.zeros(6))
        assert not torch.equal(m(ids), out) and torch.equal(model(ids), out)  # the copy is independent


def test_bad_input_names_the_argument():
    model = _Seq()
    cases = [
        (dict(shape=(2, 5), dim=0), "dim"),
        (dict(shape=(2, 5), dim=3, mode="insert"), "mode"),
        (dict(shape=(2, 5), dim=3, where="inside"), "where"),
        (dict(shape=(2, 5), dim=3, projection="sparse"), "projection"),
        (dict(shape=(10,), dim=3), "shape"),
        (dict(shape=(2, 5), dim=3, projection="identity"), "identity"),
        (dict(shape=(2, 5), dim=3, sigma=0.0), "sigma"),
        (dict(shape=(2, 5), dim=3, std=-1.0), "std"),
        (dict(shape=(2, 5), dim=3, p0=torch.zeros(3, 5)), "p0"),
        (dict(shape=(2, 5), dim=3, seed=-1), "seed"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            PromptEmbedding(model.tok, **kw)
    with pytest.raises(ValueError, match="sites"):
        PromptEmbedding([], (2, 5), 3)
    space = PromptEmbedding(model.tok, (2, 5), 3, std=1.0)
    with pytest.raises(ValueError, match="shape"):
        space.set(torch.zeros(4))
    with pytest.raises(ValueError, match="candidates"):
        with space.population(torch.zeros(2, 4)):
            pass
    with pytest.raises(ValueError, match="multiple"):
        with space.population(torch.zeros(2, 3)):
            model(torch.randint(0, 11, (3, 4)))
    with pytest.raises(ValueError, match="site"):
        space.get(site=3)
