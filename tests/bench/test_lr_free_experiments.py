"""The lr_free and schedule_free literature experiments at a tiny budget: the code path, not the claim."""

import torch

from gradkit.bench.experiments import lr_free, schedule_free


def test_lr_free_experiment_runs_and_reports_every_method(tmp_path, monkeypatch):
    monkeypatch.setattr(lr_free, "STEPS", {"quick": 20, "full": 20})
    monkeypatch.setattr(lr_free, "SGD_RATES", [1e-3, 1.0])
    threads = torch.get_num_threads()
    md = lr_free.run(tmp_path, quick=True)
    assert torch.get_num_threads() == threads  # restored
    for name in ("DoG", "LDoG", "DAdaptSGD", "DAdaptAdam", "Prodigy", "SGD, lr 1", "polynomial-decay average"):
        assert name in md
    assert (tmp_path / "lr_free.png").exists()


def test_schedule_free_experiment_reports_three_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(schedule_free, "HORIZON", {"digits": {"quick": 40, "full": 40},
                                                   "char LM": {"quick": 8, "full": 8}})
    md = schedule_free.run(tmp_path, quick=True)
    rows = [line for line in md.splitlines() if line.startswith("| digits") or line.startswith("| char LM")]
    assert len(rows) == 4  # two optimizers × two tasks
    assert all(len(r.split("|")) == 9 for r in rows)  # lr, 25 %, 50 %, 100 % filled
    assert (tmp_path / "schedule_free.png").exists()
