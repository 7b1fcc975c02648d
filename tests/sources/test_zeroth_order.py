"""The zeroth-order base: non-finite policies, forward-only closures, ZOSGD parameter groups, copies, the record."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import gradkit as gk
from gradkit.models import mlp
from gradkit.sources._perturb import Perturbation


def _problem(seed=0, dtype=torch.float32):
    model = mlp((6, 8, 3), seed=seed).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (16,), generator=gen)
    return model, (lambda: F.cross_entropy(model(x), y))


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _nan_at(closure, call):
    calls = [0]

    def bad():
        calls[0] += 1
        loss = closure()
        return loss * float("nan") if calls[0] == call else loss

    return bad


ZO = {
    "SPSA": lambda m, **kw: gk.sources.SPSA(m, eps=1e-3, n_directions=2, seed=0, **kw),
    "ES": lambda m, **kw: gk.sources.ES(m, sigma=0.05, population=4, seed=0, **kw),
    "ZOSGD": lambda m, **kw: gk.sources.ZOSGD(m, lr=0.05, eps=1e-3, n_directions=2, seed=0, **kw),
}


# ---- non-finite policy ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZO))
def test_skip_changes_nothing_counts_and_the_next_step_is_the_step_that_would_have_come(name):
    model, closure = _problem()
    before = _params(model)
    src = ZO[name](model, on_nonfinite="skip")
    loss = src.estimate(_nan_at(closure, 2))
    assert math.isnan(float(loss)) and src.nonfinite_skips == 1 and src.step_count == 0
    assert _same(before, _params(model)) and all(p.grad is None for p in model.parameters())
    src.estimate(closure)
    twin, twin_closure = _problem()
    ZO[name](twin).estimate(twin_closure)
    assert _same(_params(model), _params(twin))
    assert all((p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))
               for p, q in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("name", ["SPSA", "ES"])
def test_ignore_lets_the_nan_through_and_still_restores_the_parameters(name):
    model, closure = _problem()
    before = _params(model)
    src = ZO[name](model, on_nonfinite="ignore")
    src.estimate(_nan_at(closure, 1))
    assert _same(before, _params(model))
    assert any(bool(torch.isnan(p.grad).any()) for p in model.parameters()) or name == "ES"
    zo_model, zo_closure = _problem()
    gk.sources.ZOSGD(zo_model, on_nonfinite="ignore", seed=0).step(_nan_at(zo_closure, 1))
    assert all(bool(torch.isnan(p).all()) for p in zo_model.parameters())  # torch's behaviour: NaN everywhere


def test_worst_ranks_a_nonfinite_member_last_and_drops_a_raw_pair():
    model, _ = _problem()
    es = gk.sources.ES(model, sigma=0.1, population=6, on_nonfinite="worst", seed=0)
    losses = torch.tensor([[1.0], [3.0], [2.0], [float("nan")], [0.5], [4.0]], dtype=torch.float64)
    ranked_last = losses.clone()
    ranked_last[3] = 1e300
    torch.testing.assert_close(es.weights(losses)[1], es.weights(ranked_last)[1], rtol=0, atol=0)
    raw = gk.sources.ES(model, sigma=0.1, population=6, rank_shaping=False, on_nonfinite="worst", seed=0)
    ks, w = raw.weights(losses)
    assert w[1] == 0.0
    torch.testing.assert_close(w[[0, 2]], torch.tensor([1.0 - 3.0, 0.5 - 4.0], dtype=torch.float64) / 0.6)
    one = gk.sources.ES(model, sigma=0.1, population=3, antithetic=False, rank_shaping=False, on_nonfinite="worst")
    assert one.weights(torch.tensor([[1.0], [float("inf")], [2.0]], dtype=torch.float64))[1][1] == 0.0
    # End to end: a NaN member neither raises nor leaks into the gradient.
    model, closure = _problem()
    src = gk.sources.ES(model, sigma=0.05, population=4, on_nonfinite="worst", seed=0)
    loss = src.estimate(_nan_at(closure, 2))
    assert math.isfinite(float(loss)) and all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    with pytest.raises(gk.NonFiniteError):
        src.estimate(lambda: closure() * float("nan"))


@pytest.mark.parametrize("name", ["SPSA", "ZOSGD"])
def test_worst_is_refused_where_there_is_no_population(name):
    model, _ = _problem()
    with pytest.raises(ValueError, match="on_nonfinite"):
        ZO[name](model, on_nonfinite="worst")
    with pytest.raises(ValueError, match="on_nonfinite"):
        ZO[name](model, on_nonfinite="sometimes")


# ---- closures that run backward ---------------------------------------------------------------------------
def _lightning_like(model, closure, counter):
    """What Lightning's automatic optimization hands to optimizer.step: grad on, zero_grad, backward inside."""
    def wrapped():
        with torch.enable_grad():
            for p in model.parameters():
                p.grad = None
            loss = closure()
            loss.backward()
            counter[0] += 1
        return loss.detach()

    return wrapped


@pytest.mark.parametrize("name", ["SPSA", "ES", "ZOSGD", "ForwardGradient", "LikelihoodRatio"])
def test_a_closure_that_runs_backward_is_refused_with_what_to_do(name):
    model, closure = _problem()
    before = _params(model)
    grads = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    src = COPYABLE[name](model)
    counter = [0]
    with pytest.raises(RuntimeError, match=r"backward.*gradkit\.integrations\.lightning"):
        src.estimate(_lightning_like(model, closure, counter))
    assert counter[0] <= 1  # never a silent series of backward passes
    assert _same(before, _params(model))
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # .grad left as it was


def test_a_closure_that_builds_a_graph_is_refused():
    model, closure = _problem()

    def graph():
        with torch.enable_grad():
            return closure()

    with pytest.raises(RuntimeError, match="autograd graph"):
        gk.sources.SPSA(model, seed=0).estimate(graph)


def test_zosgd_under_lightning_automatic_optimization_raises_after_at_most_one_backward():
    pl = pytest.importorskip("lightning.pytorch")
    model, _ = _problem()
    backward_calls = [0]

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def on_after_backward(self):
            backward_calls[0] += 1

        def configure_optimizers(self):
            return gk.sources.ZOSGD(self.net.parameters(), lr=1e-3, seed=0)

    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen))
    before = _params(model)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    with pytest.raises(RuntimeError, match=r"gradkit\.integrations\.lightning"):
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8))
    assert backward_calls[0] <= 1
    assert _same(before, _params(model))


# ---- ZOSGD parameter groups ------------------------------------------------------------------------------
def test_zosgd_parameter_groups_have_their_own_lr_and_weight_decay_and_follow_schedulers():
    model, _ = _problem(dtype=torch.float64)
    twin = copy.deepcopy(model)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    zo = gk.sources.ZOSGD([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "lr": 0.02}],
                          lr=0.1, eps=1e-3, n_directions=2, seed=4)
    assert [g["lr"] for g in zo.param_groups] == [0.1, 0.02]
    assert [g["weight_decay"] for g in zo.param_groups] == [0.1, 0.0]
    sched = torch.optim.lr_scheduler.LambdaLR(zo, [lambda s: 0.5 ** s, lambda s: 1.0])
    # Reference: SPSA with the same directions (same parameter order), then the per-group update by hand.
    ref_params = [p for p in twin.parameters()]
    by_name = dict(twin.named_parameters())
    ref_groups = [([by_name[n] for n, _ in model.named_parameters() if n.endswith("weight")], 0.1, 0.1),
                  ([by_name[n] for n, _ in model.named_parameters() if n.endswith("bias")], 0.02, 0.0)]
    order = [by_name[n] for n, _ in model.named_parameters() if n.endswith("weight")] + \
        [by_name[n] for n, _ in model.named_parameters() if n.endswith("bias")]
    spsa = gk.sources.SPSA(order, eps=1e-3, n_directions=2, seed=4)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
    for step in range(4):
        zo.step(lambda: F.cross_entropy(model(x), y))
        sched.step()
        spsa.estimate(lambda: F.cross_entropy(twin(x), y))
        with torch.no_grad():
            for ps, lr, wd in ref_groups:
                lr = lr * (0.5 ** step if wd else 1.0)
                for p in ps:
                    p.mul_(1 - lr * wd).sub_(lr * p.grad)
                    p.grad = None
    for a, b in zip(model.parameters(), ref_params):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert zo.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 4) and zo.param_groups[1]["lr"] == 0.02
    assert all(p.grad is None for p in model.parameters())


def test_zosgd_groups_keep_frozen_parameters_and_validate_their_hyper_parameters():
    model, closure = _problem()
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.detach().clone()
    zo = gk.sources.ZOSGD([{"params": model[0].parameters()}, {"params": model[2].weight, "lr": 0.5}], seed=0)
    zo.step(closure)
    assert torch.equal(model[0].bias, frozen)
    with pytest.raises(ValueError, match="lr"):
        gk.sources.ZOSGD([{"params": model[0].parameters(), "lr": -1.0}])
    with pytest.raises(ValueError, match="weight_decay"):
        gk.sources.ZOSGD([{"params": model[0].parameters(), "weight_decay": -0.1}])
    with pytest.raises(ValueError, match="params"):
        gk.sources.ZOSGD([{"lr": 0.1}])


# ---- copies ------------------------------------------------------------------------------------------------
COPYABLE = {
    **ZO,
    "ForwardGradient": lambda m, **kw: gk.sources.ForwardGradient(m, seed=0),
    "LikelihoodRatio": lambda m, **kw: gk.sources.LikelihoodRatio(m, n_samples=2, seed=0),
}


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", sorted(COPYABLE))
def test_copies_step_identically(name, how):
    model, _ = _problem()
    src = COPYABLE[name](model)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    src.estimate(lambda: F.cross_entropy(model(x), y))
    bundle = (model, src)
    model2, src2 = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    for m, s in ((model, src), (model2, src2)):
        for _ in range(2):
            s.estimate(lambda m=m: F.cross_entropy(m(x), y))
    assert _same(_params(model), _params(model2))
    assert all((p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
               for p, q in zip(model.parameters(), model2.parameters()))


# ---- the restoration record -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_restoration_is_bit_exact_for_every_float_dtype_and_both_position_encodings(dtype):
    gen = torch.Generator().manual_seed(0)
    # Full-precision values (as after training) of mixed magnitudes, plus zeros, NaN and ±Inf.
    p = (torch.randn(5000, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-6, 2, (5000,),
                                                                                      generator=gen)).to(dtype)
    p[:4] = torch.tensor([0.0, float("nan"), float("inf"), -float("inf")], dtype=dtype)
    p.requires_grad_()
    orig = p.detach().clone()
    bits = torch.int16 if dtype in (torch.float16, torch.bfloat16) else (
        torch.int32 if dtype == torch.float32 else torch.int64)
    for alpha in (1e-1, 1e-3, 1e-6):  # many lossy elements (bitmask) to few (indices)
        pert = Perturbation([p], seed=1, chunk=1000)
        with pert.shifted(0, 0, alpha):
            assert not torch.equal(p.detach(), orig)
        assert torch.equal(p.detach().view(bits), orig.view(bits)), (dtype, alpha)


def test_the_record_is_small_and_its_ring_never_loses_a_record():
    torch.manual_seed(0)
    p = (torch.randn(1 << 16) * 0.02).requires_grad_()
    orig = p.detach().clone()
    pert = Perturbation([p], seed=0, chunk=1 << 12)
    pert._ring(p).capacity = 1 << 10  # far too small: records overflow, then the ring grows
    for step in range(3):
        with pert.shifted(step, 0, 1e-3):
            pass
        assert torch.equal(p.detach(), orig)
    ring = pert._rings[p.device]
    assert ring.capacity > 1 << 10 and ring.overflow == 0 and not ring.spans
    # After growing, a move (+ε → −ε in one pass) fits in the ring with no overflow.
    pert.evaluate(lambda: p.sum(), 5, [(0, 1e-3), (0, -1e-3)])
    assert torch.equal(p.detach(), orig) and ring.overflow == 0
    # Positions (≤ 1 bit per element) + an int8 code per lossy element: far below 8 bytes per lossy element.
    assert 0 < pert.record_bytes <= 0.06 * p.numel() * p.element_size()


# ---- a new zeroth-order source is only its estimator formula ------------------------------------------------
class OneSided(gk.sources.ZerothOrder):
    """Forward differences [f(θ + ε z_k) − f(θ)] / ε · z_k / K: three methods, nothing else."""

    per_item = 2

    def __init__(self, model, eps=1e-3, n_directions=2, **kw):
        self.eps, self.n_directions = eps, n_directions
        super().__init__(model, **kw)

    @property
    def n_items(self):
        return self.n_directions

    def shifts(self, item):
        return [(item, self.eps), (item, 0.0)]

    def weights(self, losses):
        return range(self.n_directions), (losses[:, 0] - losses[:, 1]) / (self.eps * self.n_directions)


def test_a_new_source_written_as_its_formula_gets_the_whole_machinery():
    model, closure = _problem(dtype=torch.float64)
    before = _params(model)
    src = OneSided(model, seed=3)
    src.estimate(closure)
    assert _same(before, _params(model))  # shifted and restored bit-exactly
    pert = src.perturbation
    f0 = float(closure())
    want = []
    for i, p in enumerate(model.parameters()):
        g = torch.zeros_like(p)
        for k in range(2):
            z = pert.direction(i, 0, k)
            with pert.shifted(0, k, 1e-3):
                fk = float(closure())
            g += (fk - f0) / (1e-3 * 2) * z
        want.append(g)
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    # ... and the policies, forward-only evaluation and per-sample closures come with it.
    skipping = OneSided(model, seed=3, on_nonfinite="skip")
    skipping.estimate(_nan_at(closure, 1))
    assert skipping.nonfinite_skips == 1 and _same(before, _params(model))
    with pytest.raises(RuntimeError, match="backward"):
        OneSided(model, seed=3).estimate(_lightning_like(model, closure, [0]))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    losses = OneSided([x], seed=0).estimate(lambda: (x ** 2).sum(1))
    assert losses.shape == (4,) and x.grad.shape == (4, 3)
