"""Named Pipeline stages: derived and given names, stats and state keyed by name, mismatches named, cheap snapshots."""

import copy

import pytest
import torch
import torch.nn.functional as F

import gradkit as gk
from gradkit.models import mlp
from gradkit.pipeline import stage_name


def _data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def _pipe(model, transforms=(), controllers=(), **kw):
    return gk.Pipeline(gk.sources.Backprop(model), transforms,
                       gk.optim.AdamW(model.parameters(), kernel="foreach"), controllers, **kw)


@pytest.mark.parametrize("cls, name", [("ClipNorm", "clip_norm"), ("AGC", "agc"), ("ZClip", "z_clip"),
                                       ("GradStats", "grad_stats"), ("AutoClip", "auto_clip")])
def test_derived_names_are_snake_case(cls, name):
    obj = getattr(gk.transforms, cls).__new__(getattr(gk.transforms, cls))
    assert stage_name(obj) == name


def test_every_stage_has_a_unique_name_in_pipeline_order():
    model = mlp((5, 6, 3), seed=0)
    pipe = _pipe(model, [gk.transforms.ClipNorm(1.0), gk.transforms.ClipNorm(0.1), gk.transforms.GradStats()],
                 [gk.control.EarlyStopping(patience=3)])
    assert list(pipe.stages) == ["backprop", "clip_norm", "clip_norm_1", "grad_stats", "adamw", "early_stopping"]
    assert pipe.name_of(pipe.transforms[1]) == "clip_norm_1"


def test_two_clip_norms_keep_separate_stats():
    model = mlp((5, 6, 3), seed=0)
    x, y = _data()
    pipe = _pipe(model, [gk.transforms.ClipNorm(1e-3), gk.transforms.ClipNorm(10.0)])
    pipe.step(lambda: F.cross_entropy(model(x), y))
    s = pipe.stats
    # The second sees the gradient the first clipped to norm ~1e-3, so the two stages report different norms.
    assert float(s["clip_norm/grad_norm"]) > 1e-2
    assert float(s["clip_norm_1/grad_norm"]) == pytest.approx(1e-3, rel=1e-3)
    assert float(s["clip_norm/clip_coef"]) < 1 and float(s["clip_norm_1/clip_coef"]) == 1.0


def test_two_autoclips_keep_separate_state_and_resume_by_name():
    model = mlp((5, 6, 3), seed=0)
    x, y = _data()
    pipe = _pipe(model, {"early": gk.transforms.AutoClip(50.0), "late": gk.transforms.AutoClip(10.0, history=2)})
    for _ in range(3):
        pipe.step(lambda: F.cross_entropy(model(x), y))
    sd = pipe.state_dict()
    assert set(sd["stages"]) == {"backprop", "early", "late", "adamw"}
    assert len(sd["stages"]["early"]["norms"]) == 3 and len(sd["stages"]["late"]["norms"]) == 2
    # Loading into a pipeline that lists the same names in the other order puts each state in its own stage.
    twin = mlp((5, 6, 3), seed=0)
    pipe2 = _pipe(twin, {"late": gk.transforms.AutoClip(10.0, history=2), "early": gk.transforms.AutoClip(50.0)})
    pipe2.load_state_dict(copy.deepcopy(sd))
    assert pipe2.stages["early"].state_dict() == sd["stages"]["early"]
    assert pipe2.stages["late"].state_dict() == sd["stages"]["late"]


def test_given_names_via_named_and_collisions():
    model = mlp((5, 6, 3), seed=0)
    src = gk.named("exact", gk.sources.Backprop(model))
    opt = gk.named("opt", gk.optim.AdamW(model.parameters(), kernel="foreach"))
    pipe = gk.Pipeline(src, [gk.named("clip_norm_1", gk.transforms.ClipNorm(1.0)), gk.transforms.ClipNorm(2.0)],
                       opt)
    # The derived name skips the one a user took.
    assert list(pipe.stages) == ["exact", "clip_norm_1", "clip_norm", "opt"]
    with pytest.raises(ValueError, match="two stages are named 'a'"):
        gk.Pipeline(gk.named("a", gk.sources.Backprop(model)), {"a": gk.transforms.ClipNorm(1.0)},
                    gk.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="without '/'"):
        gk.named("a/b", gk.transforms.ClipNorm(1.0))
    with pytest.raises(ValueError, match="transforms must be a sequence or a mapping"):
        gk.Pipeline(gk.sources.Backprop(model), gk.transforms.ClipNorm(1.0), gk.optim.AdamW(model.parameters()))


def test_one_object_in_two_roles_is_one_stage():
    model = mlp((5, 6, 3), seed=0)
    g = gk.control.GradES(model, tau=1e-9, observe="transform")
    pipe = gk.Pipeline(gk.sources.SPSA(model, seed=0), [g], torch.optim.SGD(model.parameters(), lr=0.1), [g])
    assert list(pipe.stages) == ["spsa", "grad_es", "sgd"]
    zo = gk.sources.ZOSGD(model, seed=0)
    assert list(gk.Pipeline(zo, optimizer=zo).stages) == ["zosgd"]


def test_mismatched_state_raises_naming_the_stages_and_loads_nothing():
    model = mlp((5, 6, 3), seed=0)
    x, y = _data()
    pipe = _pipe(model, [gk.transforms.ClipNorm(1.0), gk.transforms.AutoClip(10.0)])
    pipe.step(lambda: F.cross_entropy(model(x), y))
    sd = copy.deepcopy(pipe.state_dict())
    other = _pipe(mlp((5, 6, 3), seed=0), [gk.transforms.AutoClip(10.0), gk.transforms.ZClip()])
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"missing \['z_clip'\], unexpected \['clip_norm'\]"):
        other.load_state_dict(sd)
    assert other.state_dict()["stages"]["auto_clip"] == before["stages"]["auto_clip"]
    with pytest.raises(ValueError, match="stage names"):
        other.load_state_dict({"source": {}, "transforms": [], "optimizer": {}, "controllers": [], "steps": 0,
                               "skipped": 0})


def test_stats_protocol_is_shared_by_transforms_and_controllers():
    model = mlp((5, 6, 3), seed=0)
    x, y = _data()
    clip = gk.transforms.ClipNorm(0.5)
    stop = gk.control.EarlyStopping(patience=3)
    pipe = _pipe(model, [clip], [stop])
    pipe.step(lambda: F.cross_entropy(model(x), y))
    assert set(clip.stats()) == {"grad_norm", "clip_coef"}
    assert set(pipe.stats) == {"clip_norm/grad_norm", "clip_norm/clip_coef", "early_stopping/best",
                               "early_stopping/bad_checks"}
    # Alone, a transform still returns its statistics, and stats() reports the same call.
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    out = clip(model.parameters())
    assert out.keys() == clip.stats().keys() and torch.equal(out["grad_norm"], clip.stats()["grad_norm"])


def test_plain_callable_transform_reports_its_return_value():
    model = mlp((5, 6, 3), seed=0)
    x, y = _data()

    def halve(params):
        for p in params:
            if p.grad is not None:
                p.grad.mul_(0.5)
        return {"halved": 1}

    pipe = _pipe(model, {"halve": halve})
    pipe.step(lambda: F.cross_entropy(model(x), y))
    assert pipe.stats == {"halve/halved": 1}


class _CountingSource(gk.sources.Backprop):
    """Backprop whose state_dict counts its calls and holds a tensor (so a snapshot must copy it)."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = 0
        self.buf = torch.zeros(3)

    def state_dict(self):
        self.calls += 1
        return {"buf": self.buf}

    def load_state_dict(self, state):
        self.buf = state["buf"].clone()


def test_step_snapshots_the_source_once_and_copies_only_what_aliases():
    model = mlp((5, 6, 3), seed=0)
    x, y = _data()
    src = _CountingSource(model)
    pipe = gk.Pipeline(src, optimizer=gk.optim.AdamW(model.parameters(), kernel="foreach"))
    pipe.step(lambda: F.cross_entropy(model(x), y))
    assert src.calls == 1
    snap = src.snapshot()
    assert snap["buf"] is not src.buf  # a tensor the source may change in place is copied ...
    spsa = gk.sources.SPSA(model, seed=0)
    assert spsa.snapshot() == spsa.state_dict()  # ... plain numbers are kept as they are


def test_skip_restores_the_source_stream_through_the_snapshot():
    model = mlp((5, 6, 3), seed=0)
    x, y = _data()
    pipe = gk.Pipeline(gk.sources.SPSA(model, seed=0), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       on_nonfinite="skip")
    pipe.step(lambda: F.cross_entropy(model(x), y))
    state = pipe.source.state_dict()
    loss = pipe.step(lambda: F.cross_entropy(model(x), y) * float("inf"))
    assert torch.isnan(loss) and pipe.skipped == 1 and pipe.source.state_dict() == state
