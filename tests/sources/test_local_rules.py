"""Local learning rules (ForwardForward, MonoForward, NoProp, FeedbackAlignment).

Oracle: the gradient written for every block equals autograd's gradient of that block's local loss, written
here from the papers' formulas with the block's input detached, and no block's gradient depends on another
block's parameters (a rule that let gradients cross a block boundary fails the perturbation tests). Plus each
paper's rule on hand-checkable numbers, composition with every optimizer, state, copies and bad input.
"""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradkit as gk
from gradkit.sources import FeedbackAlignment, ForwardForward, MonoForward, NoProp, as_blocks
from gradkit.sources.noprop import cosine_alpha_bar

D, C, B = 7, 4, 12


def _data(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=dtype), torch.randint(0, C, (B,), generator=g)


def _mlp(sizes, last_act=True, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, dtype=dtype))
        if i < len(sizes) - 2 or last_act:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _DenoiseBlock(nn.Module):
    def __init__(self, d_in, d_z, c, h=9, dtype=torch.float64):
        super().__init__()
        self.fx = nn.Linear(d_in, h, dtype=dtype)
        self.fz = nn.Linear(d_z, h, dtype=dtype)
        self.out = nn.Linear(h, c, dtype=dtype)

    def forward(self, x, z):
        return self.out(torch.tanh(self.fx(x) + self.fz(z)))


def _ff(seed=0, **kw):
    net = _mlp((D + C, 8, 6, 5), seed=seed)
    return ForwardForward(net, C, embed="concat", seed=3, **kw), net


def _mf(seed=0, **kw):
    net = _mlp((D, 8, 6, 5), seed=seed)
    return MonoForward(net, C, seed=3, **kw), net


def _noprop(seed=0, **kw):
    torch.manual_seed(seed)
    blocks = [_DenoiseBlock(D, kw.get("embedding_dim") or C, C) for _ in range(3)]
    return NoProp(blocks, C, seed=3, **kw), blocks


def _dfa(seed=0, **kw):
    net = _mlp((D, 8, 6, C), last_act=False, seed=seed)
    return FeedbackAlignment(net, seed=3, **kw), net


RULES = {"ForwardForward": _ff, "MonoForward": _mf, "NoProp": _noprop, "FeedbackAlignment": _dfa}


def _grads(params):
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def _block_params(block):
    return [p for p in block.parameters() if p.requires_grad]


# -- declaring blocks --------------------------------------------------------------------------------------------
def test_as_blocks_cuts_sequential_after_activations():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.1),
                        nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))
    blocks = as_blocks(net)
    assert [len(b) if isinstance(b, nn.Sequential) else 1 for b in blocks] == [5, 2, 1]
    assert blocks[0][1] is net[1] and blocks[2] is net[7]  # the user's modules, not copies
    lst = [nn.Linear(2, 2), nn.Linear(2, 2)]
    assert list(as_blocks(lst)) == lst
    with pytest.raises(ValueError, match="blocks"):
        as_blocks(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="blocks"):
        as_blocks([])


# -- the oracle: each block's gradient is autograd of its own local loss, input detached -----------------------
def test_forward_forward_gradients_are_local_goodness_gradients():
    rule, net = _ff()
    x, y = _data()
    neg = copy.deepcopy(rule).negative_labels(x, y)  # the draw estimate makes first
    assert bool((neg != y).all())
    rule.estimate(lambda: (x, y))
    blocks = as_blocks(net)
    h = torch.cat([torch.cat([x, F.one_hot(y, C).double()], 1), torch.cat([x, F.one_hot(neg, C).double()], 1)])
    for i, block in enumerate(blocks):
        inp = h.detach()
        if i > 0:
            inp = inp / inp.square().mean(1, keepdim=True).add(1e-8).sqrt()
        out = block(inp)
        g = out.square().sum(1)
        theta = out.shape[1]  # default θ for goodness="sum": the block's width
        loss = torch.cat([F.softplus(theta - g[:B]), F.softplus(g[B:] - theta)]).mean()
        want = torch.autograd.grad(loss, _block_params(block))
        for p, w in zip(_block_params(block), want):
            torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-12)
        h = out.detach()


def test_mono_forward_gradients_are_local_projection_cross_entropy_gradients():
    rule, net = _mf()
    x, y = _data()
    rule.estimate(lambda: (x, y))
    h = x
    for i, block in enumerate(as_blocks(net)):
        a = block(h.detach())
        m = rule.projections[i].weight
        loss = F.cross_entropy(a @ m.T, y)
        params = _block_params(block) + [m]
        for p, w in zip(params, torch.autograd.grad(loss, params)):
            torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-12)
        h = a.detach()


def test_noprop_gradients_are_local_denoising_gradients():
    rule, blocks = _noprop(embedding="learned", embedding_dim=5)
    x, y = _data()
    eps = copy.deepcopy(rule).draw_noise(rule.embedding[y].detach())
    rule.estimate(lambda: (x, y))
    ab, T, eta = rule.alpha_bar, 3, 0.1
    snr = ab / (1 - ab)
    w_emb = rule.embedding
    emb_grad = torch.zeros_like(w_emb)
    for t in range(1, T + 1):
        u = w_emb[y]
        z = (ab[t - 1].sqrt() * u + (1 - ab[t - 1]).sqrt() * eps[t - 1]).detach()
        u_hat = blocks[t - 1](x, z).softmax(-1) @ w_emb
        loss = T / 2 * eta * float(snr[t] - snr[t - 1]) * (u_hat - u).square().sum(1).mean()
        params = _block_params(blocks[t - 1])
        got = torch.autograd.grad(loss, params + [w_emb])
        for p, w in zip(params, got[:-1]):
            torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-12)
        emb_grad += got[-1]
    u = w_emb[y]
    z_t = ab[T].sqrt() * u + (1 - ab[T]).sqrt() * eps[T]
    kl = 0.5 * ab[0] * u.square().sum(1).mean()  # ᾱ_0 = 0: the prior term is constant
    loss = F.cross_entropy(rule.head(z_t), y) + kl
    head = list(rule.head.parameters())
    got = torch.autograd.grad(loss, head + [w_emb])
    for p, w in zip(head, got[:-1]):
        torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w_emb.grad, emb_grad + got[-1], rtol=1e-10, atol=1e-12)


def test_feedback_alignment_gradients_are_local_feedback_gradients():
    rule, net = _dfa()
    x, y = _data()
    before = [b.clone() for b in rule.feedback]
    rule.estimate(lambda: (x, y))
    blocks = as_blocks(net)
    outs, h = [], x
    for block in blocks:
        out = block(h.detach())
        outs.append(out)
        h = out
    leaf = outs[-1].detach().requires_grad_()
    (e,) = torch.autograd.grad(F.cross_entropy(leaf, y), leaf)
    torch.testing.assert_close(e, (leaf.softmax(1) - F.one_hot(y, C)) / B)  # the error convention
    # Output block: its exact gradient given its (detached) input.
    last = _block_params(blocks[-1])
    for p, w in zip(last, torch.autograd.grad(F.cross_entropy(outs[-1], y), last)):
        torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-12)
    # Hidden blocks: autograd of <sg(e B_l), h_l>, and the paper's closed form δa = (e B) ⊙ f'(a), ΔW = δaᵀ h_{l-1}.
    h_prev = x
    for i in range(len(blocks) - 1):
        params = _block_params(blocks[i])
        local = (outs[i] * (e @ rule.feedback[i]).detach()).sum()
        for p, w in zip(params, torch.autograd.grad(local, params)):
            torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-12)
        lin = blocks[i][0]
        a = lin(h_prev)
        delta = (e @ rule.feedback[i]) * (a > 0).double()
        torch.testing.assert_close(lin.weight.grad, delta.T @ h_prev, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin.bias.grad, delta.sum(0), rtol=1e-12, atol=1e-12)
        h_prev = outs[i].detach()
    assert all(torch.equal(a, b) for a, b in zip(before, rule.feedback))


@pytest.mark.parametrize("name", ["ForwardForward", "MonoForward"])
def test_no_gradient_crosses_a_block_boundary(name):
    """Changing later blocks (and their projections) leaves every earlier block's gradient bit-identical; under
    backprop the first block's gradient would change."""
    rule, net = RULES[name]()
    x, y = _data()
    state = copy.deepcopy(rule.state_dict())
    rule.estimate(lambda: (x, y))
    blocks = as_blocks(net)
    inp = torch.cat([x, F.one_hot(y, C).double()], 1) if name == "ForwardForward" else x

    def backprop_first():
        return torch.autograd.grad(net(inp).square().sum(), _block_params(blocks[0]))

    bp_before = backprop_first()
    first = _grads(_block_params(blocks[0]))
    middle = _grads(_block_params(blocks[1]))
    with torch.no_grad():
        for p in blocks[2].parameters():
            p.mul_(-3.0).add_(0.5)
        if name == "MonoForward":
            rule.projections[2].weight.mul_(7.0)
            rule.projections[1].weight.mul_(-2.0)
    rule.load_state_dict({**state, "aux": {k: v for k, v in rule.aux.state_dict().items()}})
    rule.estimate(lambda: (x, y))
    assert all(torch.equal(a, b) for a, b in zip(first, _grads(_block_params(blocks[0]))))
    if name == "ForwardForward":
        assert all(torch.equal(a, b) for a, b in zip(middle, _grads(_block_params(blocks[1]))))
    # Backprop through the same network does see the change: the test can tell a non-local rule.
    assert not all(torch.allclose(a, b) for a, b in zip(bp_before, backprop_first()))


def test_noprop_block_gradient_ignores_other_blocks():
    rule, blocks = _noprop()
    x, y = _data()
    state = copy.deepcopy(rule.state_dict())
    rule.estimate(lambda: (x, y))
    g1 = _grads(_block_params(blocks[1]))
    with torch.no_grad():
        for b in (blocks[0], blocks[2]):
            for p in b.parameters():
                p.mul_(5.0)
    rule.load_state_dict(state)
    rule.estimate(lambda: (x, y))
    assert all(torch.equal(a, b) for a, b in zip(g1, _grads(_block_params(blocks[1]))))


# -- the papers' rules on hand-checkable numbers --------------------------------------------------------------------
def test_forward_forward_goodness_threshold_and_loss_by_hand():
    lin = nn.Linear(3, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    rule = ForwardForward([nn.Sequential(lin, nn.ReLU())], 2, threshold=1.5, seed=0)
    # embed="replace": the first two features become the one-hot label.
    x = torch.tensor([[9.0, 9.0, 5.0]], dtype=torch.float64)
    assert torch.equal(rule.embed_labels(x, torch.tensor([1])), torch.tensor([[0.0, 1.0, 5.0]], dtype=torch.float64))
    # positive (label 0): h = (1, 0) -> G = 1;  negative (label 1): h = (0, 2) -> G = 4
    assert rule.goodness_of(torch.tensor([[1.0, 0.0], [0.0, 2.0]])).tolist() == [1.0, 4.0]
    y = torch.tensor([0])
    loss = rule.estimate(lambda: (x, y))
    want = 0.5 * (math.log1p(math.exp(1.5 - 1.0)) + math.log1p(math.exp(4.0 - 1.5)))
    assert float(loss) == pytest.approx(want, rel=1e-12)
    # dL/dW: positive pushes G up on unit 0 (input 1 at feature 0), negative pushes G down on unit 1 (feature 1).
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    g00 = 0.5 * -sig(1.5 - 1.0) * 2 * 1.0 * 1.0
    g11 = 0.5 * sig(4.0 - 1.5) * 2 * 2.0 * 1.0
    assert lin.weight.grad[0, 0].item() == pytest.approx(g00, rel=1e-12)
    assert lin.weight.grad[1, 1].item() == pytest.approx(g11, rel=1e-12)
    # prediction: the label whose embedding gives the highest goodness (one block: nothing skipped)
    assert rule.predict(x).tolist() == [1]
    assert rule.label_goodness(x).tolist() == [[1.0, 4.0]]


def test_forward_forward_default_thresholds_and_skip_first():
    rule, _ = _ff()
    assert rule.thresholds == [8.0, 6.0, 5.0]
    assert ForwardForward(_mlp((D + C, 8, 6)), C, embed="concat", goodness="mean").thresholds == [2.0, 2.0]
    x, _ = _data()
    # skip_first: the first block's goodness does not enter the accumulated goodness.
    full = ForwardForward(rule.blocks, C, embed="concat", skip_first=False).label_goodness(x)
    skip = rule.label_goodness(x)
    first = ForwardForward(rule.blocks[:1], C, embed="concat").label_goodness(x)
    torch.testing.assert_close(full - skip, first)


def test_mono_forward_projection_loss_by_hand():
    lin = nn.Linear(2, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2, dtype=torch.float64))
    rule = MonoForward([lin], 3)
    with torch.no_grad():
        rule.projections[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    x, y = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([2])
    # G = a Mᵀ = (1, 2, 3); CE = -log softmax(G)[2]
    loss = rule.estimate(lambda: (x, y))
    g = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert float(loss) == pytest.approx(float(torch.logsumexp(g, 0) - 3.0), rel=1e-12)
    p = g.softmax(0) - torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(rule.projections[0].weight.grad, p[:, None] * torch.tensor([[1.0, 2.0]]).double())
    assert rule.logits(x).tolist() == [[1.0, 2.0, 3.0]]
    assert rule.predict(x).tolist() == [2]


def test_mono_forward_prediction_layers():
    rule, _ = _mf()
    x, _ = _data()
    each = [rule.logits(x, [i]) for i in range(3)]
    torch.testing.assert_close(rule.logits(x, "all"), each[0] + each[1] + each[2])
    torch.testing.assert_close(rule.logits(x, "last"), each[2])
    torch.testing.assert_close(rule.logits(x, [0, -1]), each[0] + each[2])


def test_noprop_schedule_targets_and_posterior():
    ab = cosine_alpha_bar(10)
    assert ab[0] == 0 and 0.999 < float(ab[-1]) < 1 and bool((ab[1:] > ab[:-1]).all())
    rule, _ = _noprop()
    ab = rule.alpha_bar
    snr = ab / (1 - ab)
    torch.testing.assert_close(rule.weights(), 3 / 2 * 0.1 * (snr[1:] - snr[:-1]))
    assert bool((rule.weights() > 0).all())
    # per-block target: the class embedding u_y (one-hot here, fixed)
    assert torch.equal(rule.embedding, torch.eye(C, dtype=torch.float64)) and not rule.embedding.requires_grad
    # a_t, b_t, c_t = the Gaussian posterior q(z_t | z_{t-1}, y): condition the joint of (z_t, z_{t-1}) in 1-D
    # with z_t ~ N(√ᾱ_t u, 1 - ᾱ_t) and z_{t-1} = √α z_t + √(1-α) ε, α = ᾱ_{t-1}/ᾱ_t.
    a, b, c = rule.posterior()
    for t in range(1, 4):
        at, ap = float(ab[t]), float(ab[t - 1])
        alpha = ap / at
        var_t, cov = 1 - at, math.sqrt(alpha) * (1 - at)
        var_p = alpha * (1 - at) + 1 - alpha
        gain = cov / var_p  # E[z_t | z_{t-1}] = √ᾱ_t u + gain (z_{t-1} - √ᾱ_{t-1} u)
        assert float(b[t - 1]) == pytest.approx(gain, rel=1e-12)
        assert float(a[t - 1]) == pytest.approx(math.sqrt(at) - gain * math.sqrt(ap), rel=1e-9, abs=1e-12)
        assert float(c[t - 1]) == pytest.approx(var_t - cov * cov / var_p, rel=1e-9, abs=1e-12)
    # ᾱ_0 = 0: block 1 ignores z_0 (b_1 = 0) and the chain's first mean is √ᾱ_1 û.
    assert float(b[0]) == 0.0 and float(a[0]) == pytest.approx(math.sqrt(float(ab[1])))


def test_noprop_prototypes_and_embedding_options():
    x = torch.tensor([[0.0], [2.0], [3.0], [10.0], [5.0], [6.0], [7.0], [20.0]])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    protos = NoProp.prototypes(x, y, 2)  # medians of distances to the others: class 0 (3, 2, 3, 8), 1 (2, 1, 2, 14)
    assert protos.tolist() == [[2.0], [6.0]]
    torch.manual_seed(0)
    blocks = [_DenoiseBlock(D, 1, 2, dtype=torch.float32) for _ in range(2)]
    rule = NoProp(blocks, 2, embedding=protos)
    assert isinstance(rule.embedding, nn.Parameter) and torch.equal(rule.embedding.detach(), protos)
    assert any(p is rule.embedding for p in rule.parameters())


def test_dfa_feedback_matrices_never_change_and_are_not_parameters():
    rule, net = _dfa()
    ids = {id(p) for p in rule.parameters()}
    assert not any(id(b) in ids for b in rule.feedback)
    before = [b.clone() for b in rule.feedback]
    assert [tuple(b.shape) for b in before] == [(C, 8), (C, 6)]
    opt = gk.optim.AdamW(rule.parameters(), lr=1e-2, weight_decay=0.1, kernel="foreach")
    pipe = gk.Pipeline(rule, optimizer=opt)
    x, y = _data()
    w0 = net[0].weight.detach().clone()
    for _ in range(5):
        pipe.step(lambda: (x, y))
    assert not torch.equal(w0, net[0].weight)
    assert all(torch.equal(a, b) for a, b in zip(before, rule.feedback))
    assert not any(b.requires_grad for b in rule.feedback)


# -- composition, learning, state, copies ----------------------------------------------------------------------
OPTIMIZERS = [c for c in gk.optim.available().values() if not getattr(c, "needs_graph", False)]


@pytest.mark.parametrize("opt_cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_with_every_optimizer(name, opt_cls):
    import inspect

    rule, _ = RULES[name]()
    kw = {"kernel": "foreach"} if "kernel" in inspect.signature(opt_cls).parameters else {}
    pipe = gk.Pipeline(rule, optimizer=opt_cls(rule.parameters(), **kw))
    before = [p.detach().clone() for p in rule.parameters()]
    x, y = _data()
    for _ in range(2):
        assert torch.isfinite(pipe.step(lambda: (x, y)))
    assert any(not torch.equal(a, b) for a, b in zip(before, rule.parameters()))
    assert all(torch.isfinite(p).all() for p in rule.parameters())


@pytest.mark.parametrize("name", sorted(RULES))
def test_local_losses_decrease_when_training(name):
    rule, _ = RULES[name]()
    pipe = gk.Pipeline(rule, optimizer=gk.optim.AdamW(rule.parameters(), lr=1e-2, kernel="foreach"))
    x, y = _data()
    losses = [float(pipe.step(lambda: (x, y))) for _ in range(60)]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


def _run(rule, opt, steps, start=0):
    for s in range(start, start + steps):
        x, y = _data(seed=100 + s)
        gk.Pipeline(rule, optimizer=opt).step(lambda: (x, y))


@pytest.mark.parametrize("name", sorted(RULES))
def test_state_dict_round_trip_bit_exact(name):
    make = RULES[name]
    a, _ = make()
    opt_a = gk.optim.AdamW(a.parameters(), lr=1e-2, kernel="foreach")
    _run(a, opt_a, 6)
    b, _ = make()
    opt_b = gk.optim.AdamW(b.parameters(), lr=1e-2, kernel="foreach")
    _run(b, opt_b, 3)
    saved = copy.deepcopy({"model": b.module.state_dict(), "rule": b.state_dict(), "opt": opt_b.state_dict()})
    c, _ = make(seed=9)  # different weights and a fresh stream: everything must come from the state
    opt_c = gk.optim.AdamW(c.parameters(), lr=1e-2, kernel="foreach")
    c.module.load_state_dict(saved["model"])
    c.load_state_dict(saved["rule"])
    opt_c.load_state_dict(saved["opt"])
    _run(c, opt_c, 3, start=3)
    assert c.step_count == a.step_count == 6
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", sorted(RULES))
def test_copies_step_identically(name, how):
    rule, _ = RULES[name]()
    _run(rule, torch.optim.SGD(rule.parameters(), lr=0.1), 2)
    twin = copy.deepcopy(rule) if how == "deepcopy" else pickle.loads(pickle.dumps(rule))
    x, y = _data(seed=7)
    la, lb = rule.estimate(lambda: (x, y)), twin.estimate(lambda: (x, y))
    assert torch.equal(la, lb)
    for p, q in zip(rule.parameters(), twin.parameters()):
        assert p is not q
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


# -- non-finite policy and bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RULES))
def test_nonfinite_raise_skip_ignore(name):
    rule, _ = RULES[name]()
    x, y = _data()
    bad = x.clone()
    bad[0, 0] = float("nan")
    rng = rule.generator.get_state()
    with pytest.raises(gk.NonFiniteError):
        rule.estimate(lambda: (bad, y))
    assert all(p.grad is None for p in rule.parameters())
    assert torch.equal(rng, rule.generator.get_state()) and rule.step_count == 0
    rule.on_nonfinite = "skip"
    assert math.isnan(float(rule.estimate(lambda: (bad, y))))
    assert rule.nonfinite_skips == 1 and all(p.grad is None for p in rule.parameters())
    assert torch.equal(rng, rule.generator.get_state())
    rule.on_nonfinite = "ignore"
    rule.estimate(lambda: (bad, y))
    assert any(p.grad is not None and not torch.isfinite(p.grad).all() for p in rule.parameters())
    # Through a Pipeline with skip: parameters unchanged, the skip counted.
    rule2, _ = RULES[name]()
    pipe = gk.Pipeline(rule2, optimizer=gk.optim.AdamW(rule2.parameters(), kernel="foreach"), on_nonfinite="skip")
    before = [p.detach().clone() for p in rule2.parameters()]
    pipe.step(lambda: (bad, y))
    assert pipe.skipped == 1 and all(torch.equal(a, b) for a, b in zip(before, rule2.parameters()))


def test_bad_input_names_the_argument():
    net = _mlp((D + C, 8, 6))
    with pytest.raises(ValueError, match="n_classes"):
        ForwardForward(net, 1)
    with pytest.raises(ValueError, match="goodness"):
        ForwardForward(net, C, goodness="max")
    with pytest.raises(ValueError, match="embed"):
        ForwardForward(net, C, embed="add")
    with pytest.raises(ValueError, match="threshold"):
        ForwardForward(net, C, threshold=-1.0)
    with pytest.raises(ValueError, match="negatives"):
        ForwardForward(net, C, negatives="hard")
    with pytest.raises(ValueError, match="on_nonfinite"):
        ForwardForward(net, C, on_nonfinite="worst")
    with pytest.raises(ValueError, match="seed"):
        MonoForward(net, C, seed=-1)
    with pytest.raises(ValueError, match="example_input"):
        MonoForward([nn.ReLU()], C)
    blocks = [_DenoiseBlock(D, C, C) for _ in range(2)]
    with pytest.raises(ValueError, match="eta"):
        NoProp(blocks, C, eta=0.0)
    with pytest.raises(ValueError, match="embedding"):
        NoProp(blocks, C, embedding="random")
    with pytest.raises(ValueError, match="alpha_bar"):
        NoProp(blocks, C, alpha_bar=torch.tensor([0.5, 0.4, 0.9]))
    with pytest.raises(ValueError, match="alpha_bar"):
        NoProp(blocks, C, alpha_bar=torch.tensor([0.0, 0.9]))
    with pytest.raises(ValueError, match="NoProp blocks"):
        NoProp(nn.Sequential(*blocks), C)
    with pytest.raises(ValueError, match="feedback"):
        FeedbackAlignment(_mlp((D, 8, C)), feedback="sparse")
    with pytest.raises(ValueError, match="scale"):
        FeedbackAlignment(_mlp((D, 8, C)), scale=0.0)
    with pytest.raises(ValueError, match="loss"):
        FeedbackAlignment(_mlp((D, 8, C)), loss=3)
    with pytest.raises(ValueError, match="two blocks"):
        FeedbackAlignment([nn.Linear(D, C)])
    rule, _ = _mf()
    with pytest.raises(ValueError, match=r"\(inputs, targets\)"):
        rule.estimate(lambda: F.cross_entropy(torch.zeros(2, C), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="batch size"):
        rule.estimate(lambda: (torch.zeros(3, D, dtype=torch.float64), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="keys"):
        rule.load_state_dict({"step": 1})


def test_gradkit_list_shows_the_local_rules():
    from gradkit.cli import methods

    names = {n for stage, n, _ in methods() if stage == "sources"}
    assert {"ForwardForward", "MonoForward", "NoProp", "FeedbackAlignment"} <= names
