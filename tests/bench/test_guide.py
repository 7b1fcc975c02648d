"""Smoke test of ``gradkit bench guide`` on the tiny test-bed (seconds; the numbers mean nothing)."""

import pytest

pytest.importorskip("sklearn")

from gradkit.bench import guide  # noqa: E402
from gradkit.cli import build_parser  # noqa: E402
from tests.helpers import table_cells  # noqa: E402


def test_bench_guide_tiny_writes_every_quick_row_with_exact_nfe(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADKIT_CACHE_DIR", str(tmp_path / "cache"))
    args = build_parser().parse_args(["bench", "guide", "--tiny", "--no-grids", "--out", str(tmp_path)])
    assert guide.run(args) == 0
    text = (tmp_path / "guide.md").read_text()
    quick = [r for r in guide.rows(low_nfe=(2,)) if r.quick]
    for r in quick:
        assert f"| {r.label} |" in text, r.label
    # NFE per sample is exact bookkeeping: 4 Euler steps, a cond+uncond pair counts 2, CFG-Zero* zeroes step 0
    nfe = {r.label: float(table_cells(text, r.label)[2]) for r in quick}
    assert nfe["conditional (w=1)"] == 4 and nfe["CFG w=3"] == 8 and nfe["CFG-Zero* w=3"] == 6
    assert nfe["CFG w=3, 2 steps"] == 4 and nfe["CFG-Zero* w=3, 2 steps"] == 2
    assert nfe["CG noise-aware w=3 (backprop)"] == 4 and nfe["CG noise-aware w=3 (SPSA K=4)"] == 4
    assert float(table_cells(text, "CG noise-aware w=3 (backprop)")[3]) == 4  # one classifier call per step
    assert float(table_cells(text, "CG noise-aware w=3 (SPSA K=4)")[3]) >= 4 * 8  # 2K evaluations per step
    assert "## Claims" in text and "APG vs CFG at w=8" in text


def test_bench_guide_only_and_grids(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("GRADKIT_CACHE_DIR", str(tmp_path / "cache"))
    args = build_parser().parse_args(["bench", "guide", "--tiny", "--only", "CFG w=3,unconditional",
                                      "--out", str(tmp_path)])
    assert guide.run(args) == 0
    text = (tmp_path / "guide.md").read_text()
    assert "| unconditional |" in text and "| CFG w=3 |" in text and "| APG" not in text
    assert (tmp_path / "grids" / "cfg-w-3.png").stat().st_size > 1000
    assert (tmp_path / "guide.png").stat().st_size > 1000
    bad = build_parser().parse_args(["bench", "guide", "--tiny", "--only", "no such row", "--out", str(tmp_path)])
    assert guide.run(bad) == 2
