"""Smoke test of ``gradkit bench guide --part particles`` on the tiny test-bed (seconds; the numbers mean nothing)."""

import pytest

pytest.importorskip("sklearn")

from gradkit.bench import guide  # noqa: E402
from gradkit.cli import build_parser  # noqa: E402
from tests.helpers import table_cells  # noqa: E402


def test_bench_guide_particles_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADKIT_CACHE_DIR", str(tmp_path / "cache"))
    args = build_parser().parse_args(["bench", "guide", "--part", "particles", "--tiny", "--no-grids",
                                      "--out", str(tmp_path)])
    assert guide.run(args) == 0
    text = (tmp_path / "guide_particles.md").read_text()
    for label in ("best-of-N N=2", "FK steering diff N=2", "FK steering max N=2", "FK steering sum N=2",
                  "FK steering rt N=2", "look-ahead search R=2", "classifier guidance w=3 (noise-aware clf)",
                  "D-Flow 1 L-BFGS steps", "noise search SPSA K=4, 1 Adam steps"):
        assert f"| {label} |" in text, label
    # NFE per output sample is exact bookkeeping (4 steps): N candidates / particles cost N·4; the velocity cache
    # makes FK steering's potentials free; look-ahead: 4 + (R − 1) per guided step but the last
    assert float(table_cells(text, "best-of-N N=2")[1]) == 8
    assert float(table_cells(text, "FK steering diff N=2")[1]) == 8
    assert float(table_cells(text, "look-ahead search R=2")[1]) == 7
    assert "FK steering claim" in text and "ink in the top-left quadrant" in text
    assert "D-Flow 1 L-BFGS steps (zero gradient)" in text


def test_bench_guide_particles_bad_reward(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADKIT_CACHE_DIR", str(tmp_path / "cache"))
    args = build_parser().parse_args(["bench", "guide", "--part", "particles", "--tiny", "--rewards", "nope",
                                      "--out", str(tmp_path)])
    assert guide.run(args) == 2
