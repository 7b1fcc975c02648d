"""The digits test-bed of gradkit.guide: data scaling, the flow model's conditioning, caching, metrics."""

import pytest
import torch

pytest.importorskip("sklearn")

from gradkit.guide import testbed as T  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADKIT_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_flow_size_and_conditioning():
    torch.manual_seed(0)
    m = T.DigitsFlow()
    assert 180_000 < sum(p.numel() for p in m.parameters()) < 200_000  # GUIDE §9(ii): ≈ 0.19 M
    x = torch.randn(5, 64)
    y = torch.tensor([0, 3, 9, 1, 2])
    v = m(x, torch.full((5,), 0.3), y)
    assert torch.equal(v, m(x, 0.3, y))  # scalar t broadcasts
    null = m(x, 0.3, None)
    assert torch.equal(null, m(x, 0.3, T.NULL_CLASS))
    assert torch.equal(null, m(x, 0.3, torch.full((5,), -1)))
    assert not torch.allclose(null, v)
    assert m.prediction == "velocity"


def test_halves_are_disjoint_and_cover():
    a, b = T._halves(1348)
    assert len(set(a.tolist()) & set(b.tolist())) == 0 and len(a) + len(b) == 1348


def test_load_tiny_trains_caches_and_reloads_identically(cache):
    logs = []
    tb = T.load("tiny", log=logs.append)
    assert float(tb.data[0].min()) == -1.0 and float(tb.data[0].max()) == 1.0  # pixels in [-1, 1]
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 5 and all(f.startswith("digits-") and f.endswith(".pt") for f in files)
    assert all(v > 0 for v in tb.train_seconds.values())
    tb2 = T.load("tiny", log=logs.append)
    assert all(v == 0 for v in tb2.train_seconds.values())  # everything from the cache
    for a, b in [(tb.flow, tb2.flow), (tb.judge, tb2.judge), (tb.noisy_guide, tb2.noisy_guide)]:
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    # a corrupt file is retrained (and rewritten), with a message
    flow_file = next(p for p in cache.iterdir() if p.name.startswith("digits-flow-"))
    flow_file.write_bytes(b"not a checkpoint")
    tb3 = T.load("tiny", log=logs.append)
    assert tb3.train_seconds["flow"] > 0 and any("unreadable" in m for m in logs)
    assert torch.equal(tb3.flow.net[0].weight, tb.flow.net[0].weight)  # deterministic retraining


def test_cache_key_depends_on_config_and_no_cache_writes_nothing(cache, tmp_path):
    cfg = T.TINY["flow"]
    assert T._key("flow", cfg) != T._key("flow", T.with_steps(cfg, cfg.steps + 1))
    assert T._key("flow", cfg) == T._key("flow", T.FlowConfig(**{**cfg.__dict__}))
    T.load("tiny", cache=False, log=lambda s: None)
    assert list(cache.iterdir()) == []


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("GRADKIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert T.cache_dir() == tmp_path / "gradkit"
    monkeypatch.setenv("GRADKIT_CACHE_DIR", str(tmp_path / "x"))
    assert T.cache_dir() == tmp_path / "x"


def test_load_rejects_bad_arguments():
    with pytest.raises(ValueError, match="budget"):
        T.load("huge")
    with pytest.raises(ValueError, match="unknown"):
        T.load("tiny", cache=False, flows=T.FlowConfig())


def test_frechet_distance_oracle():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen,
                                                                              dtype=torch.float64)
    assert abs(T.frechet_distance(a, a)) < 1e-9
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0], dtype=torch.float64)
    assert T.frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)
    # scaling by c: ‖(1 − c)μ‖² + tr(Σ + c²Σ − 2cΣ) = (1 − c)²(‖μ‖² + tr Σ)
    c = 1.7
    expected = (1 - c) ** 2 * float(a.mean(0).square().sum() + torch.cov(a.T).trace())
    assert T.frechet_distance(a, c * a) == pytest.approx(expected, rel=1e-8)
    # against scipy's matrix square root on two unrelated sets
    scipy_linalg = pytest.importorskip("scipy.linalg")
    b = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    ca, cb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    ref = float(((a.mean(0) - b.mean(0)) ** 2).sum()) + ca.trace() + cb.trace() \
        - 2 * scipy_linalg.sqrtm(ca @ cb).real.trace()
    assert T.frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)


def test_evaluator_on_real_digits(cache):
    tb = T.load("tiny", cache=False, log=lambda s: None)
    xte, yte = tb.data[2], tb.data[3]
    r = tb.evaluator(xte, yte)
    assert r["diversity"] == pytest.approx(1.0)  # the test digits against themselves
    assert abs(r["fd"]) < 1e-6 and r["overshoot"] == 0.0 and r["fd_floor"] > 0
    blown = tb.evaluator(3 * xte, yte)  # |3x| − 1 = 2 on saturated pixels
    assert blown["overshoot"] == pytest.approx(float((3 * xte.abs() - 1).clamp_min(0).mean()))
    assert blown["overshoot"] > 0.5
    collapsed = tb.evaluator(xte[:1].expand(len(yte), 64), yte)
    assert collapsed["diversity"] == 0.0


def test_image_grid_layout():
    x = torch.full((6, 64), -1.0)  # blank digits: white
    x[1] = 1.0  # one fully inked digit
    img = T.image_grid(x, nrow=2, pad=1)
    assert img.shape == (2 * 9 + 1, 3 * 9 + 1)
    assert float(img[1:9, 10:18].max()) == 0.0 and float(img[1:9, 1:9].min()) == 1.0
