import json

from gradkit.bench import lm
from gradkit.cli import build_parser


def test_lm_bench_smoke_includes_a_graph_optimizer(tmp_path):
    args = build_parser().parse_args(["bench", "lm", "--steps", "3", "--opt", "AdamW,AdaHessian", "--lrs", "1",
                                      "--threads", "1", "--out", str(tmp_path)])
    assert lm.run(args) == 0
    table = (tmp_path / "lm.md").read_text()
    assert "| AdamW |" in table and "| AdaHessian |" in table and "val@3" in table
    data = json.loads((tmp_path / "lm.json").read_text())
    assert not data["skipped"]
    for runs in data["runs"].values():
        assert runs[0]["steps"][-1] == 3 and 2.0 < runs[0]["final"] < 5.0 and runs[0]["state_bytes"] > 0


def test_lr_grid_covers_every_optimizer():
    for name in lm.our_optimizers():
        grid = lm.lr_grid(name)
        assert grid and all(g is None or g > 0 for g in grid), name
