import pytest
import torch

import gradkit as gk
from gradkit._kernels.orthogonalize import newton_schulz, newton_schulz_many, ns_polynomial, singular_value_band
from gradkit.models import CharTransformer
from tests.helpers import SHAPES, assert_parity, assert_state_dict_roundtrip, make_params, two_groups

BAND = (0.68, 1.135)  # φ⁵ over σ/‖G‖_F ∈ [0.01, 1] with the default coefficients


def test_band_constant_matches_the_polynomial():
    lo, hi = singular_value_band(smallest=0.01)
    assert BAND[0] <= lo and hi <= BAND[1] and lo < 0.69 and hi > 1.13


@pytest.mark.parametrize("shape", [(64, 16), (16, 48), (8, 3, 3, 3)])
def test_update_singular_values_lie_in_the_newton_schulz_band(kernel, shape):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(shape, generator=gen)
    p = torch.zeros(shape, requires_grad=True)
    # momentum 0, lr 1: the update is exactly s·NS₅(G), s = √max(1, rows/cols).
    opt = gk.optim.Muon([p], lr=1.0, momentum=0.0, kernel=kernel)
    p.grad = g.clone()
    opt.step()
    rows, cols = shape[0], g[0].numel()
    scale = max(1.0, rows / cols) ** 0.5
    sv = torch.linalg.svdvals(-p.detach().reshape(rows, cols).double() / scale)
    gs = torch.linalg.svdvals(g.reshape(rows, cols).double())
    assert float((gs / gs.norm()).min()) > 0.01  # the inputs are inside the band's domain
    assert float(sv.min()) >= BAND[0] and float(sv.max()) <= BAND[1], sv
    # Sharper: each singular value is the iterated scalar polynomial of the input's (float32 round-off).
    expected = ns_polynomial(gs / gs.norm()).sort(descending=True).values
    torch.testing.assert_close(sv, expected, atol=2e-3, rtol=0)


def test_batched_newton_schulz_equals_one_by_one():
    gen = torch.Generator().manual_seed(1)
    mats = [torch.randn(12, 7, generator=gen) for _ in range(3)] + [torch.randn(5, 9, generator=gen)]
    many = newton_schulz_many(mats)
    for m, o in zip(mats, many):
        torch.testing.assert_close(o, newton_schulz(m), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="G"):
        newton_schulz(torch.ones(3))


def test_non_matrix_parameters_follow_torch_adamw(kernel):
    # The AdamW half reuses gradkit's AdamW rule: it must match torch.optim.AdamW step for step.
    kw = dict(betas=(0.9, 0.99), eps=1e-8)

    def ours(ps):
        return gk.optim.Muon(two_groups(ps, adamw_lr=2e-3, adamw_weight_decay=0.2), lr=1e-2, adamw_lr=1e-2,
                             adamw_betas=kw["betas"], adamw_weight_decay=0.05, use_muon=False, kernel=kernel)

    def ref(ps):
        return torch.optim.AdamW(two_groups(ps, lr=2e-3, weight_decay=0.2), lr=1e-2, weight_decay=0.05, **kw)

    assert_parity(ours, ref)


def _ref_muon_step(w, g, buf, lr, mu, wd):
    # An independent float64 statement of the update: lerp momentum, Nesterov, NS₅, shape scale, decay.
    buf.mul_(mu).add_(g, alpha=1 - mu)
    u = g + mu * (buf - g)
    m = u.reshape(u.shape[0], -1)
    x = m / (m.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    x = x.T if tall else x
    s = max(1.0, m.shape[0] / m.shape[1]) ** 0.5
    w.mul_(1 - lr * wd).sub_(lr * s * x.reshape(w.shape))


def test_muon_matrices_match_an_independent_float64_statement(kernel):
    shapes = [(33, 17), (4, 6, 5), (64, 8)]
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]
    ref = [p.detach().clone() for p in ps]
    bufs = [torch.zeros_like(p) for p in ref]
    opt = gk.optim.Muon(ps, lr=0.02, weight_decay=0.1, kernel=kernel)
    for _ in range(30):
        for p, w, b in zip(ps, ref, bufs):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            _ref_muon_step(w, p.grad, b, 0.02, 0.95, 0.1)
        opt.step()
    for p, w in zip(ps, ref):
        torch.testing.assert_close(p.detach(), w, atol=1e-9, rtol=0)


def test_automatic_routing_and_model_groups():
    ps = make_params()
    opt = gk.optim.Muon(ps, kernel="foreach")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    for p, s in zip(ps, SHAPES):
        assert ("momentum_buffer" in opt.state[p]) == (len(s) >= 2)
        assert ("exp_avg" in opt.state[p]) == (len(s) < 2)
    model = CharTransformer(20, d_model=16, n_layer=1, block=8, seed=0)
    groups = gk.optim.Muon.param_groups(model, lr=0.01)
    muon_ids = {id(p) for p in groups[0]["params"]}
    assert groups[0]["use_muon"] and groups[0]["lr"] == 0.01 and not groups[1]["use_muon"]
    assert id(model.tok.weight) not in muon_ids and id(model.pos.weight) not in muon_ids
    assert id(model.blocks[0].qkv.weight) in muon_ids
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_muon_state_dict_roundtrip(kernel):
    assert_state_dict_roundtrip(lambda ps: gk.optim.Muon(two_groups(ps, lr=1e-3), lr=1e-2, weight_decay=0.1,
                                                         kernel=kernel))


@pytest.mark.parametrize("arg,value", [("momentum", 1.0), ("ns_steps", 0), ("adjust_lr", "spectral"),
                                       ("adamw_betas", (0.9, 1.5)), ("adamw_eps", 0.0), ("adamw_lr", -1.0),
                                       ("use_muon", "yes"), ("ns_coefficients", (1.0, 2.0))])
def test_muon_bad_input_names_argument(arg, value):
    with pytest.raises(ValueError, match=arg):
        gk.optim.Muon(make_params(), **{arg: value}, kernel="foreach")


def test_use_muon_on_vectors_is_rejected():
    with pytest.raises(ValueError, match="use_muon"):
        gk.optim.Muon([{"params": [torch.zeros(3, requires_grad=True)], "use_muon": True}], kernel="foreach")
