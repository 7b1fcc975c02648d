"""``gradkit bench first_step`` on a tiny budget: the code path (fresh processes, cold cache, table), not timings."""

import json

from gradkit.bench import first_step
from gradkit.cli import build_parser


def test_first_step_bench_runs_fresh_processes_and_reports_ratios(tmp_path):
    args = build_parser().parse_args(["bench", "first_step", "--repeats", "1", "--steps", "3", "--steady-steps", "2",
                                      "--only", "torch AdamW (default),gradkit Lion", "--caches", "cold",
                                      "--models", "5 tensors",
                                      "--threads", "1", "--out", str(tmp_path)])
    assert first_step.run(args) == 0
    table = (tmp_path / "first_step.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| cold")]
    assert len(rows) == 2, table  # exact labels: the kernel=compiled row is not selected
    assert all("error" not in r.lower() for r in rows), table
    raw = json.loads((tmp_path / "first_step.json").read_text())
    for runs in raw.values():
        (r,) = runs
        assert 0 < r["first_s"] <= r["total_s"] and r["steady_ms"] > 0 and r["compiles"] == 0
