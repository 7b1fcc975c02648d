"""Per-sample (batched) closures: one parameter x of shape [B, d], a closure returning B losses.

Row b's estimate must use only loss[b] and row b of each direction: it equals the scalar estimate of the one-row
problem with the same row of directions, changing sample j's loss leaves every other row's estimate bit for bit,
and each row's estimate is unbiased for that row's gradient.
"""

import pytest
import torch

import gradkit as gk
from tests.sources.stats import assert_detects_scale_error, assert_unbiased

B, D = 5, 7


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64).requires_grad_()
    target = torch.randn(B, D, generator=gen, dtype=torch.float64)
    scale = torch.rand(B, 1, generator=gen, dtype=torch.float64) + 0.5
    return x, target, scale


def per_sample(x, target, scale):
    """ℓ_b(x_b): a smooth non-quadratic loss of row b alone."""
    return (scale * (x - target) ** 2).sum(1) + torch.sin(x).sum(1)


def quadratic(x, target, scale):
    return (scale * (x - target) ** 2).sum(1)


def _true_rows(x, target, scale, loss=per_sample):
    xx = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(xx, target, scale).sum(), xx)
    return g


SOURCES = {
    "SPSA": lambda x, s=0: gk.sources.SPSA([x], eps=1e-3, n_directions=3, seed=s),
    "SPSA-rademacher": lambda x, s=0: gk.sources.SPSA([x], eps=1e-3, n_directions=3, seed=s,
                                                      distribution="rademacher"),
    "ES": lambda x, s=0: gk.sources.ES([x], sigma=0.05, population=6, seed=s),
    "ES-raw": lambda x, s=0: gk.sources.ES([x], sigma=0.05, population=5, antithetic=False, rank_shaping=False,
                                           seed=s),
}


def _module(x):
    m = torch.nn.Module()
    m.x = torch.nn.Parameter(x.detach().clone())
    return m


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_row_b_equals_the_scalar_estimate_of_the_one_row_problem_with_the_same_directions(name):
    x, target, scale = _problem()
    src = SOURCES[name](x)
    losses = src.estimate(lambda: per_sample(x, target, scale))
    assert losses.shape == (B,) and losses.dtype == torch.float64
    batched = x.grad.clone()
    before = x.detach().clone()
    assert torch.equal(x.detach(), before)
    n_dirs = src.n_directions if name.startswith("SPSA") else (src.population // 2 if src.antithetic
                                                                else src.population)
    dirs = [src.perturbation.direction(0, 0, k) for k in range(n_dirs)]
    for b in range(B):
        row = x.detach()[b:b + 1].clone().requires_grad_()
        one = SOURCES[name](row)
        # The one-row problem draws row b of the batched problem's directions.
        one.perturbation._chunks = (lambda i, step, k, slot="z", b=b:
                                    iter([(0, D, dirs[k][b].clone())]))
        loss_b = one.estimate(lambda row=row, b=b: per_sample(row, target[b:b + 1], scale[b:b + 1]).sum())
        torch.testing.assert_close(batched[b], row.grad[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(losses[b], loss_b.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", sorted(SOURCES) + ["ForwardGradient", "Backprop", "ZOSGD"])
def test_changing_one_sample_leaves_every_other_row_bit_for_bit(name):
    rows = []
    sign = torch.ones(B, dtype=torch.float64)
    sign[2] = -1.0  # sample 2's loss is negated (its ranks reverse too)
    for flip in (False, True):
        x, target, scale = _problem()
        s = sign if flip else torch.ones(B, dtype=torch.float64)
        if name == "ForwardGradient":  # the closure must read m.x when called (it is swapped for a dual)
            m = _module(x)
            src, param = gk.sources.ForwardGradient(m, n_directions=2, seed=0), m.x
            src.estimate(lambda: s * per_sample(m.x, target, scale))
            rows.append(m.x.grad.clone())
            continue
        elif name == "Backprop":
            src, param = gk.sources.Backprop([x]), x
        elif name == "ZOSGD":
            src, param = gk.sources.ZOSGD([x], lr=0.1, eps=1e-3, n_directions=2, seed=0), x
        else:
            src, param = SOURCES[name](x), x
        src.estimate(lambda p=param: s * per_sample(p, target, scale))
        rows.append(param.detach().clone() if name == "ZOSGD" else param.grad.clone())
    other = [b for b in range(B) if b != 2]
    assert torch.equal(rows[0][other], rows[1][other]), name
    assert not torch.equal(rows[0][2], rows[1][2]), name


def _draws(src, loss, n, x, target, scale):
    out = torch.empty(n, B * D, dtype=torch.float64)
    for i in range(n):  # every step draws new directions
        src.estimate(lambda: loss(x, target, scale))
        out[i] = x.grad.reshape(-1)
    return out


UNBIASED = {
    "SPSA": lambda x: gk.sources.SPSA([x], eps=1e-3, n_directions=4, seed=1),
    "SPSA-rademacher": lambda x: gk.sources.SPSA([x], eps=1e-3, n_directions=4, seed=1, distribution="rademacher"),
    "ES-raw-antithetic": lambda x: gk.sources.ES([x], sigma=0.05, population=8, rank_shaping=False, seed=1),
}


@pytest.mark.parametrize("name", sorted(UNBIASED))
def test_every_row_is_unbiased(name):
    # On a quadratic, SPSA's central difference is exact along z and ES's smoothed gradient is the gradient.
    # All rows are tested at once: the χ² statistic covers every coordinate of every row.
    x, target, scale = _problem(1)
    g = _true_rows(x, target, scale, quadratic)
    draws = _draws(UNBIASED[name](x), quadratic, 800, x, target, scale)
    assert_unbiased(draws, g.reshape(-1))
    assert_detects_scale_error(draws, g.reshape(-1))


def test_forward_gradient_rows_are_unbiased_and_backprop_is_the_gradient_of_the_sum():
    x, target, scale = _problem(2)
    g = _true_rows(x, target, scale)
    m = _module(x)
    draws = torch.empty(2000, B * D, dtype=torch.float64)
    src = gk.sources.ForwardGradient(m, seed=0)
    for i in range(len(draws)):
        losses = src.estimate(lambda: per_sample(m.x, target, scale))
        draws[i] = m.x.grad.reshape(-1)
    assert losses.shape == (B,)
    assert_unbiased(draws, g.reshape(-1))
    assert_detects_scale_error(draws, g.reshape(-1))
    losses = gk.sources.Backprop([x]).estimate(lambda: per_sample(x, target, scale))
    assert losses.shape == (B,) and not losses.requires_grad
    torch.testing.assert_close(x.grad, g)
    torch.testing.assert_close(losses, per_sample(x, target, scale).detach())


def test_forward_gradient_guess_projects_each_row_on_its_own_guess():
    x, target, scale = _problem(3)
    g = _true_rows(x, target, scale)
    u = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    m = _module(x)
    gk.sources.ForwardGradient(m, guess=lambda: [u]).estimate(lambda: per_sample(m.x, target, scale))
    want = ((g * u).sum(1) / (u * u).sum(1))[:, None] * u
    torch.testing.assert_close(m.x.grad, want)


def test_zosgd_batched_equals_spsa_batched_then_sgd_and_returns_the_losses():
    x, target, scale = _problem(4)
    y = x.detach().clone().requires_grad_()
    zo = gk.sources.ZOSGD([x], lr=0.05, eps=1e-3, n_directions=2, seed=3)
    spsa = gk.sources.SPSA([y], eps=1e-3, n_directions=2, seed=3)
    sgd = torch.optim.SGD([y], lr=0.05)
    for _ in range(4):
        la = zo.step(lambda: per_sample(x, target, scale))
        lb = spsa.estimate(lambda: per_sample(y, target, scale))
        sgd.step()
        torch.testing.assert_close(la, lb)
        assert la.shape == (B,)
    torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-10, atol=1e-12)
    assert x.grad is None


def test_batched_closures_are_rejected_where_they_cannot_apply():
    x, target, scale = _problem()
    two = [x, torch.zeros(3, dtype=torch.float64, requires_grad=True)]
    with pytest.raises(ValueError, match="scalar"):  # two parameters: no row structure
        gk.sources.SPSA(two, seed=0).estimate(lambda: per_sample(x, target, scale))
    with pytest.raises(ValueError, match="scalar"):  # wrong length
        gk.sources.SPSA([x], seed=0).estimate(lambda: per_sample(x, target, scale)[:3])
    with pytest.raises(ValueError, match="shape"):  # scalar then per-sample
        calls = [0]

        def flip():
            calls[0] += 1
            out = per_sample(x, target, scale)
            return out.sum() if calls[0] == 1 else out

        gk.sources.SPSA([x], seed=0).estimate(flip)
    assert x.grad is None

    class SplitComm:  # what a Comm does on a rank: evaluate this rank's share, then gather
        def split(self, n):
            return range(n)

        def gather_scalars(self, compute, n, per_item=1):
            return compute()

    src = gk.sources.SPSA([x], seed=0)
    src.comm = SplitComm()
    before = x.detach().clone()
    with pytest.raises(ValueError, match="comm=None"):
        src.estimate(lambda: per_sample(x, target, scale))
    assert torch.equal(x.detach(), before)
