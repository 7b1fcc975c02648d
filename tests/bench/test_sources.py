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
