"""MFAC: the inverse-Fisher-vector product against the dense solve, the sliding window, the optimizer's update
against a dense reference, state and copies. (Step time linear in m: ``gradkit bench local --part mfac``.)"""

import copy
import pickle

import pytest
import torch

import gradkit as gk
from gradkit.optim.mfac import InverseFisherWindow
from tests.helpers import assert_state_dict_roundtrip, make_params, run_sequence


def _dense(grads, damp, v):
    m, d = grads.shape
    f = damp * torch.eye(d, dtype=torch.float64) + grads.T @ grads / m
    return torch.linalg.solve(f, v)


@pytest.mark.parametrize("damp", [1e-5, 1e-2, 1.0])
def test_ifvp_equals_dense_solve(damp):
    d, m = 200, 16
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(m, d, generator=gen, dtype=torch.float64)
    w = InverseFisherWindow(d, m, damp, dtype=torch.float64)
    for g in grads:
        w.update(g)
    for _ in range(3):
        v = torch.randn(d, generator=gen, dtype=torch.float64)
        want = _dense(grads, damp, v)
        got = w.mul(v)
        assert float((got - want).norm() / want.norm()) < 1e-5
    # and for a vector in the window (the optimizer's case), where the two terms nearly cancel
    want = _dense(grads, damp, grads[3])
    assert float((w.mul(grads[3]) - want).norm() / want.norm()) < 1e-5


def test_window_slides_and_starts_with_zero_gradients():
    d, m, damp = 50, 8, 1e-3
    gen = torch.Generator().manual_seed(1)
    seq = torch.randn(20, d, generator=gen, dtype=torch.float64)
    w = InverseFisherWindow(d, m, damp, dtype=torch.float64)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    for i in range(3):
        w.update(seq[i])
    # 3 of 8 slots filled: the empty ones are zero gradients and the normalisation stays 1/m (the authors' code)
    padded = torch.cat([seq[:3], torch.zeros(m - 3, d, dtype=torch.float64)])
    torch.testing.assert_close(w.mul(v), _dense(padded, damp, v), rtol=1e-8, atol=1e-10)
    for i in range(3, 20):
        u = w.update_mul(seq[i])
        torch.testing.assert_close(u, _dense(seq[max(0, i - m + 1):i + 1] if i >= m - 1 else
                                             torch.cat([seq[:i + 1], torch.zeros(m - i - 1, d).double()]),
                                             damp, seq[i]), rtol=1e-7, atol=1e-9)
    assert w.count == 20 and w.last == 20 % m


def test_matches_sequential_rank_one_woodbury():
    """The paper's static form: H_0 = I/λ, H_i = H_{i-1} - H g gᵀ H / (m + gᵀ H g)."""
    d, m, damp = 30, 6, 1e-2
    gen = torch.Generator().manual_seed(2)
    grads = torch.randn(m, d, generator=gen, dtype=torch.float64)
    h = torch.eye(d, dtype=torch.float64) / damp
    for g in grads:
        hg = h @ g
        h = h - torch.outer(hg, hg) / (m + g @ hg)
    w = InverseFisherWindow(d, m, damp, dtype=torch.float64)
    for g in grads:
        w.update(g)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(w.mul(v), h @ v, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w.dense_inverse(), h, rtol=1e-8, atol=1e-6)


def test_optimizer_update_matches_dense_reference():
    """Two groups (different lr / weight decay), momentum, one shared window over the flat vector."""
    ps = make_params(((5, 4), (7,), (3, 2)), seed=3, dtype=torch.float64)
    ref = [p.detach().clone() for p in ps]
    groups = [{"params": ps[:2], "lr": 0.01, "weight_decay": 0.1}, {"params": ps[2:], "lr": 0.03}]
    m, damp, mu = 4, 1e-2, 0.5
    opt = gk.optim.MFAC(groups, m=m, damp=damp, momentum=mu)
    window = []
    buf = None
    gen = torch.Generator().manual_seed(4)
    for _ in range(9):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        flat = torch.cat([(grads[0] + 0.1 * ref[0]).reshape(-1), (grads[1] + 0.1 * ref[1]).reshape(-1),
                          grads[2].reshape(-1)])
        window = (window + [flat])[-m:]
        g_mat = torch.stack(window + [torch.zeros_like(flat)] * (m - len(window)))
        u = _dense(g_mat, damp, flat)
        buf = (1 - mu) * u if buf is None else mu * buf + (1 - mu) * u
        lrs = [0.01] * 27 + [0.03] * 6
        ref_flat = torch.cat([r.reshape(-1) for r in ref]) - torch.tensor(lrs, dtype=torch.float64) * buf
        ref = [ref_flat[:20].view(5, 4), ref_flat[20:27], ref_flat[27:].view(3, 2)]
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-8, atol=1e-9)


def test_one_gradient_in_the_window_by_hand():
    """F = λI + g gᵀ/m: F⁻¹ g = g / (λ + ‖g‖²/m), and F⁻¹ v = v / λ for v ⟂ g."""
    d, m, damp = 5, 4, 0.5
    g = torch.tensor([1.0, 2.0, 0.0, -1.0, 3.0], dtype=torch.float64)
    w = InverseFisherWindow(d, m, damp, dtype=torch.float64)
    u = w.update_mul(g)
    torch.testing.assert_close(u, g / (damp + 15.0 / m), rtol=1e-14, atol=0)
    v = torch.tensor([2.0, -1.0, 7.0, 0.0, 0.0], dtype=torch.float64)  # orthogonal to g
    torch.testing.assert_close(w.mul(v), v / damp, rtol=1e-14, atol=1e-14)


def test_state_dict_round_trip_bit_exact():
    assert_state_dict_roundtrip(lambda p: gk.optim.MFAC(p, lr=1e-4, m=8, damp=1e-1, momentum=0.9))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_step_identically(how):
    params, opt = run_sequence(lambda p: gk.optim.MFAC(p, lr=1e-4, m=8, damp=1e-1, momentum=0.5), steps=5)
    twin = copy.deepcopy((params, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((params, opt)))
    run_sequence(lambda p: None, steps=3, start=5, params=params, opt=opt)
    run_sequence(lambda p: None, steps=3, start=5, params=twin[0], opt=twin[1])
    for a, b in zip(params, twin[0]):
        assert torch.equal(a, b)


def test_bad_input_names_the_argument():
    ps = make_params()
    for kw, name in [({"m": 0}, "m"), ({"damp": 0.0}, "damp"), ({"momentum": 1.0}, "momentum"), ({"lr": -1.0}, "lr"),
                     ({"weight_decay": -1.0}, "weight_decay"), ({"kernel": "cuda"}, "kernel")]:
        with pytest.raises(ValueError, match=name):
            gk.optim.MFAC(ps, **kw)
    w = InverseFisherWindow(4, 2, 1.0)
    with pytest.raises(ValueError, match="4 elements"):
        w.update(torch.zeros(5))
