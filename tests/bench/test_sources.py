"""Smoke test of `gradkit bench sources` pieces (the benchmark itself runs from the CLI, never as a test)."""

import pytest

from gradkit.bench import sources as bench


class _Bar:
    def advance(self, n=1, description=None):
        pass


@pytest.mark.parametrize("method", bench.METHODS, ids=lambda m: m.label)
def test_every_benchmarked_method_trains_and_counts_evaluations(method):
    res = bench._train(method, 4 * method.calls, _Bar())
    assert res["calls"][-1] == 4 * method.calls
    assert all(0.0 <= a <= 1.0 for a in res["acc"])
    assert bench._acc_at(res, 0) != bench._acc_at(res, 0)  # nothing recorded before the first evaluation


def test_memory_child_and_rows_on_the_quick_parameter_heavy_model():
    # In this process (the benchmark runs each measurement in a fresh one); only the bookkeeping is checked.
    mem = {m: bench.memory_child(m, "parameters-quick", steps=1) for m in ("inference", "zosgd")}
    assert mem["zosgd"]["param_bytes"] == mem["inference"]["param_bytes"] > 8 * 2**20
    assert all(v["peak"] >= v["rest"] > 0 and v["peak"] >= v["runtime"] > 0 for v in mem.values())
    rows = bench.memory_rows(mem)
    assert rows[0][0].startswith("inference") and rows[0][2] == 1.0 and rows[0][4] == 1.0
    assert bench._memory_model("parameters") == ((64, 4096, 4096, 4096, 10), 64)
