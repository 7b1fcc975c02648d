"""Smoke test of ``gradkit bench search`` pieces on a tiny configuration (correctness only, no timing)."""

from __future__ import annotations

import argparse

import pytest

from gradkit.bench import search as bench

pytest.importorskip("cocoex")
pytest.importorskip("cma")


def _args(**kw):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_hit_times_follow_the_targets():
    h = bench._hit_times([(1, 50.0), (7, 1e-3), (9, 1e-9)])
    assert h[0] == 1  # 10^2 >= 50: hit at the first evaluation
    assert h[bench.TARGETS < 50].min() == 7 and h[-1] == 9


def test_bbob_part_on_two_functions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything COCO might write lands in the temporary directory
    args = _args(functions="1,2", dims="2", instances="1", budget=500.0,
                 solvers="gradkit CMAES,pycma CMA-ES")
    lines = bench.run_bbob(args, tmp_path)
    table = "\n".join(lines)
    assert "gradkit CMAES" in table and "pycma CMA-ES" in table
    # f1 (sphere) is solved to 1e-8 by both within 250·d evaluations
    f1 = [ln for ln in lines[-1].splitlines() if ln.startswith("| f1 |")][0]
    assert f1.split("|")[2].strip() == "1" and f1.split("|")[3].strip() == "1"
    assert not (tmp_path / "exdata").exists()


def test_fopt_matches_a_solved_run():
    import cocoex

    suite = cocoex.Suite("bbob", "", "dimensions: 2 instance_indices: 1 function_indices: 8")
    for problem in suite:
        fopt = bench._fopt(problem)
        trace = bench._solve(problem, bench.RUNNERS["gradkit CMAES"](), 3000, 0, fopt)
        assert 0 <= trace[-1][1] <= 1e-8 and problem.final_target_hit
