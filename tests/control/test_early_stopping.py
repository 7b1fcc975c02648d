import pytest

import gradkit as gk


def test_stops_after_patience_checks_without_min_delta_improvement():
    es = gk.control.EarlyStopping(patience=3, min_delta=0.1)
    for v in [1.0, 0.8, 0.75, 0.72, 0.71]:  # 0.75, 0.72, 0.71 improve by less than 0.1 on 0.8
        stop = es.update(v)
    assert stop and es.best == 0.8 and es.best_step == 2


def test_improvement_resets_and_max_mode():
    es = gk.control.EarlyStopping(patience=2, mode="max")
    for v in [0.1, 0.05, 0.2, 0.1]:
        es.update(v)
    assert not es.should_stop and es.best == 0.2
    es.update(float("nan"))
    assert es.should_stop


def test_as_pipeline_controller_watches_the_loss():
    es = gk.control.EarlyStopping(patience=2)
    for loss in [3.0, 2.0, 2.5, 2.1]:
        es.after_step(loss)
    assert es.should_stop


def test_roundtrip():
    es = gk.control.EarlyStopping(patience=3)
    for v in [1.0, 2.0]:
        es.update(v)
    es2 = gk.control.EarlyStopping(patience=3)
    es2.load_state_dict(es.state_dict())
    for e in (es, es2):
        e.update(3.0)
        e.update(4.0)
    assert es.state_dict() == es2.state_dict() and es2.should_stop


@pytest.mark.parametrize("name,kw", [("patience", dict(patience=0)), ("min_delta", dict(patience=1, min_delta=-1)),
                                     ("mode", dict(patience=1, mode="up"))])
def test_bad_input(name, kw):
    with pytest.raises(ValueError, match=name):
        gk.control.EarlyStopping(**kw)
