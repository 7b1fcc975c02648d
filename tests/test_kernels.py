import pytest
import torch

from gradkit._kernels import Elementwise, TensorList, all_finite, compile_available, resolve_kernel, sq_norms


def _rule(p, g, m, *, a, b):
    m.lerp_(g, a)
    p.sub_((m.sign() * b + g.abs().sqrt().sigmoid() / (m.square() + 1.0)).clamp(-2.0, 2.0))


RULE = Elementwise(_rule, "test_rule")


def _lists(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]


def test_three_paths_agree(kernel):
    ref = _lists()
    RULE("loop", ref, {"a": 0.1, "b": 0.5})
    got = _lists()
    RULE(kernel, got, {"a": 0.1, "b": 0.5})
    for x, y in zip(ref[0] + ref[2], got[0] + got[2]):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_compiled_does_not_recompile_when_scalars_change():
    ok, why = compile_available()
    if not ok:
        pytest.skip(why)
    from torch._dynamo.utils import counters

    kernel = Elementwise(_rule, "test_rule_recompile")
    lists = _lists()
    kernel("compiled", lists, {"a": 0.1, "b": 0.5})
    before = counters["stats"]["unique_graphs"]
    for i in range(5):
        kernel("compiled", lists, {"a": 0.1 + i / 10, "b": 0.5 * i})
    assert counters["stats"]["unique_graphs"] == before


def test_tensorlist_rejects_unsupported_operands():
    tl = TensorList([torch.ones(2)])
    with pytest.raises(TypeError):
        tl + torch.ones(2)


def test_resolve_kernel_validates():
    with pytest.raises(ValueError, match="kernel"):
        resolve_kernel("gpu")
    assert resolve_kernel("loop") == "loop"


def test_all_finite_and_norms():
    ts = [torch.ones(3), torch.full((2,), 3e38)]
    assert all_finite(ts)  # large but finite: a sum would overflow, the check must not
    assert not all_finite(ts + [torch.tensor([float("nan")])])
    assert not all_finite([torch.tensor([1.0, float("-inf")])])
    assert all_finite([])
    n = sq_norms([torch.ones(4), torch.full((3,), 2.0, dtype=torch.float64)])
    assert [float(x) for x in n] == pytest.approx([4.0, 12.0], rel=1e-12)
