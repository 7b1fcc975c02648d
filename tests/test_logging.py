import csv
import math
import warnings

import pytest
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


def test_gk_logging_is_reachable_from_the_package():
    import subprocess
    import sys

    # A fresh interpreter: here the test module's own import would already have set the attribute.
    out = subprocess.run([sys.executable, "-c", "import gradkit as gk; print(gk.logging.StatsLogger.__name__)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "StatsLogger"


def test_numpy_scalars_arrays_and_nan_are_logged_nd_tensors_skipped_with_one_warning(tmp_path):
    np = pytest.importorskip("numpy")
    stats = {"np32": np.float32(1.5), "np64": np.float64(-2.0), "npbool": np.bool_(True), "npint": np.int64(3),
             "np0d": np.array(4.0), "np1d": np.array([5.0, 6.0]), "nan": float("nan"),
             "tnan": torch.tensor(float("nan")), "inf": torch.tensor(float("inf")), "none": None,
             "mat": torch.ones(2, 2), "text": "x"}
    flat = flatten_stats(stats, skipped := [])
    assert list(flat) == ["np32", "np64", "npbool", "npint", "np0d", "np1d/0", "np1d/1", "nan", "tnan", "inf"]
    assert flat["np32"] == 1.5 and flat["npbool"] == 1.0 and flat["np1d/1"] == 6.0 and flat["inf"] == float("inf")
    assert math.isnan(flat["nan"]) and math.isnan(flat["tnan"])
    assert skipped == ["mat", "text"]
    with StatsLogger(tmp_path) as log, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log.log(1, stats)
        log.log(2, stats)
    assert len([w for w in caught if "not logging ['mat', 'text']" in str(w.message)]) == 1
    rows = list(csv.DictReader(open(tmp_path / "stats.csv")))
    values = {(r["step"], r["name"]): r["value"] for r in rows}
    assert values[("1", "nan")] == "nan" and values[("2", "inf")] == "inf" and values[("1", "np1d/0")] == "5.0"
    assert ("1", "mat") not in values


def test_tensorboard_sink_receives_the_same_values_as_the_csv_including_nan(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is needed for this sink")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with StatsLogger(tmp_path, tensorboard=True) as log:
        assert log.tensorboard
        for step in range(1, 4):
            log.log(step, {"loss": torch.tensor(1.0 / step), "norms": torch.tensor([1.0, 2.0 * step]),
                           "z": float("nan") if step == 2 else float(step), "np": __import__("numpy").float32(step)})
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "norms/0", "norms/1", "z", "np"}
    z = [e.value for e in acc.Scalars("z")]
    assert z[0] == 1.0 and math.isnan(z[1]) and z[2] == 3.0
    assert [e.step for e in acc.Scalars("norms/1")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("norms/1")] == [2.0, 4.0, 6.0]
    csv_rows = list(csv.DictReader(open(tmp_path / "stats.csv")))
    assert len(csv_rows) == 3 * 5
