import csv
import warnings

import torch
import torch.nn.functional as F

import gradkit as gk
from gradkit.logging import StatsLogger, flatten_stats


def test_flatten_stats_handles_numbers_tensors_and_skips_the_rest():
    flat = flatten_stats({"a": 1, "b": True, "c": torch.tensor(2.5), "d": torch.tensor([1.0, 2.0]), "e": "x"})
    assert flat == {"a": 1.0, "b": 1.0, "c": 2.5, "d/0": 1.0, "d/1": 2.0}


def test_pipeline_stats_and_controller_stats_reach_the_csv(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    pipe = gk.Pipeline(gk.sources.Backprop(model), [gk.transforms.ClipNorm(0.1), gk.transforms.GradStats()],
                       torch.optim.SGD(model.parameters(), lr=0.1),
                       [gk.control.GradES(model, tau=1e-9), gk.control.EarlyStopping(patience=5)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # without tensorboard installed: a warning, CSV only
        log = StatsLogger(tmp_path, tensorboard=True)
    with log:
        for _ in range(3):
            loss = pipe.step(lambda: F.mse_loss(model(x), y))
            log.log_pipeline(pipe, loss=loss)
    rows = list(csv.DictReader(open(tmp_path / "stats.csv")))
    names = {r["name"] for r in rows}
    assert {"clip_norm/grad_norm", "grad_stats/cosine", "grad_stats/norms/1", "grad_es/frozen_fraction",
            "early_stopping/best", "loss"} <= names
    assert {r["step"] for r in rows} == {"1", "2", "3"}
    norm = [float(r["value"]) for r in rows if r["name"] == "clip_norm/grad_norm" and r["step"] == "1"][0]
    assert norm > 0.1  # the logged norm is the one before clipping
