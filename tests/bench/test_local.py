"""Smoke test of `gradkit bench local` pieces (the benchmark itself runs from the CLI, never as a test)."""

import pytest
import torch

from gradkit.bench import local as bench
from gradkit.data import digits


@pytest.fixture(scope="module")
def data():
    xtr, ytr, xte, yte = digits(seed=0)
    return xtr[:256], ytr[:256], xte[:100], yte[:100]


@pytest.mark.parametrize("name", bench.RULES)
def test_every_benchmarked_rule_trains_and_predicts(name, data):
    r = bench.train_rule(name, 1, 3e-3, width=16, depth=2, data=data)
    assert len(r["acc"]) == 1 and 0.0 <= r["acc"][0] <= 1.0 and r["params"] > 0


def test_shifted_digits_and_few_shot():
    x = torch.arange(64.0).view(1, 64)
    assert bench.shifted_digits(x, "roll")[0, :8].tolist() == [7.0, 0, 1, 2, 3, 4, 5, 6]
    assert bench.shifted_digits(x, "flip")[0, :8].tolist() == [7.0, 6, 5, 4, 3, 2, 1, 0]
    y = torch.arange(40) % 4
    fx, fy = bench.few_shot(torch.randn(40, 3), y, 3, seed=0)
    assert fx.shape == (12, 3) and torch.bincount(fy).tolist() == [3, 3, 3, 3]


def test_bbt_comparison_runs_every_method_within_the_budget(data):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 10))
    for p in model.parameters():
        p.requires_grad_(False)
    xtr, ytr, xte, yte = data
    out = bench.bbt_compare(model, xtr[:40], ytr[:40], xte, yte, budget=30, d=4, seed=0)
    assert len(out) == 7 and all(0.0 <= v <= 1.0 for v in out.values())
    assert all(not p.requires_grad for p in model.parameters())
