import logging
import threading

import pytest
import torch

import gradkit as gk
from gradkit._kernels import (
    ROWS,
    WIDE_ROWS,
    Elementwise,
    TensorList,
    add_compile_hook,
    all_finite,
    compile_available,
    resolve_kernel,
    sq_norm_total,
    sq_norms,
)
from gradkit._kernels import compiling as KC


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


# -- the compiled path: one graph for every layout, background compiles under auto, no global settings -----------


def _needs_compile():
    ok, why = compile_available()
    if not ok:
        pytest.skip(f"torch.compile unavailable: {why}")


def _layout(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]


def _events():
    events = []
    return events, add_compile_hook(events.append)


LAYOUTS = [[(5, 3), (7,), (2, 2, 2)], [(40, 30)] * (ROWS + 3), [(3,), (1,), (64, 2), (9, 9), (2,)] * 4, [(17, 5)]]


def test_one_compiled_graph_serves_every_layout():
    _needs_compile()
    from torch._dynamo.utils import counters

    kernel = Elementwise(_rule, "test_rule_layouts")
    events, hook = _events()
    try:
        graphs_before = counters["stats"]["unique_graphs"]
        for seed, shapes in enumerate(LAYOUTS):
            ref, got = _layout(shapes, seed), _layout(shapes, seed)
            RULE("loop", ref, {"a": 0.3, "b": 0.5})
            kernel("compiled", got, {"a": 0.3, "b": 0.5})
            for x, y in zip(ref[0] + ref[2], got[0] + got[2]):
                torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    finally:
        hook.remove()
    assert len(events) == 1 and events[0].ok and not events[0].background, events
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    # 3, 11, 16 (+ 4 one-element rows, run eagerly) and 1 rows: 1 + 2 + 2 + 1 calls of ROWS rows
    assert kernel.graphs.graph_calls == 1 + 2 + 2 + 1


def test_large_layouts_switch_to_the_wide_graph_without_changing_a_bit():
    _needs_compile()
    narrow = Elementwise(_rule, "test_rule_narrow_only")
    wide = Elementwise(_rule, "test_rule_wide")
    shapes = [(30, 20)] * (WIDE_ROWS + 5)  # one wide call + one narrow call once the wide graph is ready
    a, b = _layout(shapes, 5), _layout(shapes, 5)
    events, hook = _events()
    try:
        narrow("compiled", a, {"a": 0.1, "b": 0.5})  # compiles the narrow graph, starts the wide one
        wide("compiled", b, {"a": 0.1, "b": 0.5})
        assert wide.graphs.wait(timeout=900) and narrow.graphs.wait(timeout=900)
        # keep `narrow` on its narrow graph (its wide one stays compiled but unused)
        narrow.graphs.ready = {k for k in narrow.graphs.ready if k[0] != KC.WIDE}
        narrow.graphs.failed |= {KC.graph_key(k, WIDE_ROWS) for k in narrow.graphs.ready}
        calls = wide.graphs.graph_calls
        for i in range(3):
            narrow("compiled", a, {"a": 0.2, "b": 0.1 * i})
            wide("compiled", b, {"a": 0.2, "b": 0.1 * i})
    finally:
        hook.remove()
    assert wide.graphs.graph_calls == calls + 3 * 2  # 37 rows: one call of 32 rows, one of 8 (5 + 3 pads)
    assert [(e.background, "rows per call" in e.signature) for e in events if e.rule == "test_rule_wide"] == [
        (False, False), (True, True)]
    for x, y in zip(a[0] + a[2], b[0] + b[2]):
        assert torch.equal(x, y)


def test_rows_that_cannot_be_flattened_run_eagerly_with_the_same_numbers(kernel):
    # row 0 non-contiguous (transposed) in every list, row 1 a single element, row 2 an ordinary row
    lists = [[torch.randn(6, 4).t(), torch.randn(1), torch.randn(3, 2)] for _ in range(3)]
    ref = [[t.clone() for t in lst] for lst in lists]
    RULE("loop", ref, {"a": 0.2, "b": 0.1})
    RULE(kernel, lists, {"a": 0.2, "b": 0.1})
    for x, y in zip(ref[0] + ref[2], lists[0] + lists[2]):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_auto_compiles_in_the_background_and_switches(monkeypatch):
    _needs_compile()
    monkeypatch.setenv("GRADKIT_COMPILE_AFTER", "0")
    kernel = Elementwise(_rule, "test_rule_auto_switch")
    ref, got = _layout(LAYOUTS[1], 3), _layout(LAYOUTS[1], 3)
    events, hook = _events()
    try:
        for i in range(3):
            RULE("loop", ref, {"a": 0.1 * i, "b": 0.5})
            kernel("auto", got, {"a": 0.1 * i, "b": 0.5})
        assert kernel.graphs.wait(timeout=900)
        calls = kernel.graphs.graph_calls
        for i in range(3):
            RULE("loop", ref, {"a": 0.2, "b": 0.1 * i})
            kernel("auto", got, {"a": 0.2, "b": 0.1 * i})
    finally:
        hook.remove()
    assert [e.background for e in events] == [True] and events[0].ok
    assert kernel.graphs.graph_calls == calls + 3 * 2  # every later call ran the graph (11 rows = 2 calls)
    for x, y in zip(ref[0] + ref[2], got[0] + got[2]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_auto_never_waits_for_a_compile(monkeypatch):
    """A compile that takes forever: every step still runs at once, on the eager path, with foreach's numbers."""
    monkeypatch.setenv("GRADKIT_COMPILE_AFTER", "0")
    monkeypatch.setattr(KC, "_probe_result", None)
    monkeypatch.setattr(KC, "_auto_disabled", None)
    monkeypatch.setattr(KC, "_cheap_unavailable", lambda: None)
    release, started = threading.Event(), threading.Event()

    def slow_compile(self, sig, background, width=KC.ROWS):
        started.set()
        release.wait(60)
        with self._lock:
            self.pending.discard(KC.graph_key(sig, width))
        return False

    monkeypatch.setattr(KC.CompiledRule, "compile", slow_compile)
    kernel = Elementwise(_rule, "test_rule_never_waits")
    ref, got = _layout(LAYOUTS[1], 4), _layout(LAYOUTS[1], 4)
    try:
        for _ in range(5):
            RULE("foreach", ref, {"a": 0.1, "b": 0.5})
            kernel("auto", got, {"a": 0.1, "b": 0.5})
        assert started.wait(10) and kernel.graphs.pending  # the compile runs (and hangs) in its thread
        for x, y in zip(ref[0] + ref[2], got[0] + got[2]):
            assert torch.equal(x, y)
    finally:
        release.set()
    assert kernel.graphs.wait(timeout=60)


def test_short_auto_jobs_never_compile_or_probe(monkeypatch):
    monkeypatch.delenv("GRADKIT_COMPILE_AFTER", raising=False)
    monkeypatch.setattr(KC, "_probe_result", None)
    events, hook = _events()
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        opt = gk.optim.Lion(model.parameters(), lr=1e-3)
        for _ in range(20):
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    finally:
        hook.remove()
    assert opt.kernel == "auto" or KC.auto_unavailable() is not None
    assert events == [] and KC._probe_result is None


def test_failed_background_compile_warns_once_and_stays_eager(monkeypatch, caplog):
    monkeypatch.setenv("GRADKIT_COMPILE_AFTER", "0")
    monkeypatch.setattr(KC, "_probe_result", None)
    monkeypatch.setattr(KC, "_auto_disabled", None)
    monkeypatch.setattr(KC, "_cheap_unavailable", lambda: None)

    def broken(*args, **kwargs):
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(KC.CompiledRule, "_functions", lambda self: (broken, broken))
    kernel = Elementwise(_rule, "test_rule_broken")
    ref, got = _layout(LAYOUTS[0], 5), _layout(LAYOUTS[0], 5)
    with caplog.at_level(logging.INFO, logger="gradkit.kernels"):
        kernel("auto", got, {"a": 0.1, "b": 0.5})
        assert kernel.graphs.wait(timeout=60)
        for _ in range(3):
            kernel("auto", got, {"a": 0.1, "b": 0.5})
    for _ in range(4):
        RULE("foreach", ref, {"a": 0.1, "b": 0.5})
    records = [r for r in caplog.records if r.name == "gradkit.kernels"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING and "backend exploded" in records[0].message
    assert KC.auto_unavailable() is not None and "backend exploded" in KC.auto_unavailable()
    for x, y in zip(ref[0] + ref[2], got[0] + got[2]):
        assert torch.equal(x, y)


def test_one_info_line_per_compile(caplog):
    _needs_compile()
    kernel = Elementwise(_rule, "test_rule_logged")
    with caplog.at_level(logging.INFO, logger="gradkit.kernels"):
        for _ in range(3):
            kernel("compiled", _layout(LAYOUTS[0], 0), {"a": 0.1, "b": 0.5})
    records = [r for r in caplog.records if r.name == "gradkit.kernels"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "test_rule_logged" in records[0].message and " s " in records[0].message


def test_no_process_wide_torch_setting_changes():
    _needs_compile()
    cfg = torch._dynamo.config
    names = [n for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit") if hasattr(cfg, n)]
    before = {n: getattr(cfg, n) for n in names}
    threads = torch.get_num_threads()
    opt = gk.optim.Lion([torch.randn(4, 4, requires_grad=True)], kernel="compiled")
    opt.param_groups[0]["params"][0].grad = torch.randn(4, 4)
    opt.step()
    assert {n: getattr(cfg, n) for n in names} == before and torch.get_num_threads() == threads


@pytest.mark.parametrize("cls,kw", [(gk.optim.AdamW, {}), (gk.optim.AdamW, {"amsgrad": True}),
                                    (gk.optim.Adam, {"weight_decay": 0.1}), (gk.optim.Adam, {"amsgrad": True})])
def test_auto_adam_runs_torchs_fused_kernel_with_torchs_numbers(monkeypatch, cls, kw):
    calls = []
    for name in ("_fused_adamw_", "_fused_adam_"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **k: (calls.append(1), _real(*a, **k))[1])
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen, requires_grad=True) for s in [(5, 3), (7,), (2, 2, 2)]]
    ref = [p.detach().clone().requires_grad_() for p in ps]
    start = [p.detach().clone() for p in ps]
    ours = cls(ps, lr=1e-2, kernel="auto", **kw)
    theirs = getattr(torch.optim, cls.__name__)(ref, lr=1e-2, **kw)
    for _ in range(200):
        for a, b in zip(ps, ref):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        ours.step()
        theirs.step()
    assert len(calls) == 200
    moved = max(float((a.detach() - b).abs().max()) for a, b in zip(ps, start))
    assert moved > 1e-3  # ≥ 100× the tolerance: the comparison is not vacuous
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _count_host_reads(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        out = fn()
    return out, Count.n


def test_reductions_read_the_host_once_whatever_the_number_of_tensors():
    ts = [torch.randn(3) for _ in range(40)] + [torch.randn(2, dtype=torch.float64) for _ in range(9)]
    ok, reads = _count_host_reads(lambda: all_finite(ts))
    assert ok and reads == 1
    bad, reads = _count_host_reads(lambda: all_finite(ts + [torch.tensor([float("inf")])]))
    assert not bad and reads == 1
    total, reads = _count_host_reads(lambda: sq_norm_total(ts))
    assert reads == 1 and total == pytest.approx(sum(float(t.double().square().sum()) for t in ts), rel=1e-6)


def test_an_optimizer_step_with_the_nonfinite_check_reads_the_host_once():
    ps = [torch.randn(4, 4, requires_grad=True) for _ in range(30)]
    for p in ps:
        p.grad = torch.randn(4, 4)
    opt = gk.optim.AdamW(ps, kernel="foreach", on_nonfinite="raise")
    _, reads = _count_host_reads(opt.step)
    assert reads == 1
