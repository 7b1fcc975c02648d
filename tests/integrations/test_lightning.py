"""gradkit under PyTorch Lightning: resume bit for bit, Schedule-Free evaluated at x, no silent backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is not installed (extra gradkit[lightning])")

import gradkit as gk  # noqa: E402
from gradkit.integrations.lightning import GradkitCallback, gradkit_step  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:.*val_dataloader",
                                        "ignore:.*LeafSpec", "ignore:.*GPU available")

X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
Y = X @ torch.randn(8, 1, generator=torch.Generator().manual_seed(1)) + 0.1


def loader():
    ds = torch.utils.data.TensorDataset(X, Y)
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)  # 4 batches per epoch


def make_trainer(root, callbacks=(), **kw):
    kw.setdefault("max_epochs", 2)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=str(root), callbacks=list(callbacks), **kw)


class Net(L.LightningModule):
    """``kind``: "adamw" (automatic optimization), "spsa" (Pipeline: SPSA + ClipNorm + AdamW, manual),
    "zosgd" (ZOSGD, manual), "zosgd-auto" (ZOSGD returned under automatic optimization), "sf" (ScheduleFreeAdamW)."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.kind = kind
        self.automatic_optimization = kind in ("adamw", "sf", "zosgd-auto")
        self.val_snapshots: list[list[torch.Tensor]] = []
        self.val_modes: list[bool] = []
        self.backward_calls = 0
        for p in self.net.parameters():
            p.register_hook(self._count)

    def _count(self, grad):
        self.backward_calls += 1
        return grad

    def configure_optimizers(self):
        ps = self.net.parameters()
        if self.kind == "adamw":
            return gk.optim.AdamW(ps, lr=1e-2, kernel="foreach")
        if self.kind == "sf":
            return gk.optim.ScheduleFreeAdamW(ps, lr=5e-2, kernel="foreach")
        if self.kind in ("zosgd", "zosgd-auto"):
            self.zo = gk.sources.ZOSGD(self.net, lr=1e-2, eps=1e-3, n_directions=2, seed=3)
            return self.zo
        self.pipe = gk.Pipeline(gk.sources.SPSA(self.net, eps=1e-3, n_directions=2, seed=5),
                                transforms=[gk.transforms.ClipNorm(1.0)],
                                optimizer=gk.optim.AdamW(ps, lr=1e-2, kernel="foreach"))
        return self.pipe.optimizer

    def loss(self, batch):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self.loss(batch)
        stepper = self.zo if self.kind == "zosgd" else self.pipe
        return gradkit_step(self, stepper, lambda: self.loss(batch))

    def validation_step(self, batch, batch_idx):
        self.val_snapshots.append([p.detach().clone() for p in self.net.parameters()])
        self.val_modes.append(self.optimizers().optimizer.training)

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])


def params(model):
    return [p.detach().clone() for p in model.net.parameters()]


def fit_straight_and_resumed(kind, root, callback=True):
    cb = (lambda: [GradkitCallback()]) if callback else (lambda: [])
    straight = Net(kind)
    make_trainer(root / "a", cb()).fit(straight, loader())

    first = Net(kind)
    t1 = make_trainer(root / "b", cb(), max_epochs=1)
    t1.fit(first, loader())
    ckpt = root / "half.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = Net(kind)
    t2 = make_trainer(root / "c", cb())
    t2.fit(resumed, loader(), ckpt_path=str(ckpt))
    assert t2.global_step == 8
    return straight, resumed


@pytest.mark.parametrize("kind", ["adamw", "spsa", "zosgd"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(kind, tmp_path):
    straight, resumed = fit_straight_and_resumed(kind, tmp_path)
    first = Net(kind)
    assert any(not torch.equal(a, b) for a, b in zip(params(straight), params(first))), "training did not move"
    for a, b in zip(params(straight), params(resumed)):
        assert torch.equal(a, b)
    if kind == "spsa":  # the source's step counter and the transform state came back with the checkpoint
        assert resumed.pipe.state_dict()["stages"]["spsa"] == straight.pipe.state_dict()["stages"]["spsa"]
        assert resumed.pipe.steps == straight.pipe.steps == 8


def test_without_the_callback_a_resumed_spsa_run_repeats_its_directions(tmp_path):
    straight, resumed = fit_straight_and_resumed("spsa", tmp_path, callback=False)
    assert resumed.pipe.source.state_dict()["step"] == 4  # restarted at 0: the first 4 directions were reused
    assert any(not torch.equal(a, b) for a, b in zip(params(straight), params(resumed)))


def test_checkpoint_holds_named_stage_states_and_refuses_a_mismatch(tmp_path):
    model = Net("spsa")
    trainer = make_trainer(tmp_path, [GradkitCallback()], max_epochs=1)
    trainer.fit(model, loader())
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=False)
    assert set(ckpt["gradkit"]) == {"pipe"}
    stages = ckpt["gradkit"]["pipe"]["stages"]
    assert stages["adamw"] is None  # Lightning's optimizer_states holds it, once
    assert stages["spsa"]["step"] == 4

    class Renamed(Net):
        def configure_optimizers(self):
            out = super().configure_optimizers()
            self.pipeline, self.pipe = self.pipe, None
            return out

        def training_step(self, batch, batch_idx):
            return gradkit_step(self, self.pipeline, lambda: self.loss(batch))

    match = r"no saved state for \['pipeline'\].*saved states without a stage: \['pipe'\]"
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path / "r", [GradkitCallback()]).fit(Renamed("spsa"), loader(), ckpt_path=tmp_path / "x.ckpt")


def test_pipeline_stats_are_logged(tmp_path):
    model = Net("spsa")
    trainer = make_trainer(tmp_path, [GradkitCallback()], max_epochs=1)
    trainer.fit(model, loader())
    logged = trainer.logged_metrics
    assert {"pipe/clip_norm/grad_norm", "pipe/clip_norm/clip_coef", "pipe/skipped"} <= set(logged)
    assert float(logged["pipe/skipped"]) == 0.0
    assert float(logged["pipe/clip_norm/grad_norm"]) > 0


def test_gradkit_step_counts_global_steps_and_never_backpropagates_a_zeroth_order_source(tmp_path):
    model = Net("zosgd")
    trainer = make_trainer(tmp_path, [GradkitCallback()], max_steps=6)
    trainer.fit(model, loader())
    assert trainer.global_step == 6
    assert model.backward_calls == 0
    assert all(p.grad is None for p in model.net.parameters())
    # Same numbers as the plain loop with the same seed on the same batches.
    ref = Net("zosgd")
    zo = gk.sources.ZOSGD(ref.net, lr=1e-2, eps=1e-3, n_directions=2, seed=3)
    batches = list(loader())
    for i in range(6):
        batch = batches[i % 4]
        zo.step(lambda: ref.loss(batch))
    for a, b in zip(params(model), params(ref)):
        assert torch.equal(a, b)


def test_gradkit_step_refuses_automatic_optimization(tmp_path):
    class Auto(Net):
        def training_step(self, batch, batch_idx):
            return gradkit_step(self, self.optimizers().optimizer, lambda: self.loss(batch))

    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        make_trainer(tmp_path).fit(Auto("adamw"), loader())


def test_zosgd_under_automatic_optimization_raises_before_any_backward(tmp_path):
    model = Net("zosgd-auto")
    before = params(model)
    with pytest.raises(RuntimeError, match=r"automatic_optimization = False.*gradkit_step"):
        make_trainer(tmp_path, [GradkitCallback()]).fit(model, loader())
    assert model.backward_calls == 0
    assert all(p.grad is None for p in model.net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, params(model)))


def test_without_the_callback_zosgd_refuses_lightnings_backward_closure(tmp_path):
    # ZOSGD itself detects the closure that ran backward (one pass, Lightning's), puts .grad back and raises,
    # pointing at this integration; with GradkitCallback the same setup is refused before any backward (above).
    model = Net("zosgd-auto")
    before = params(model)
    with pytest.raises(RuntimeError, match=r"gradkit\.integrations\.lightning"):
        make_trainer(tmp_path).fit(model, loader())
    assert model.backward_calls <= len(before)  # at most one backward pass (one hook call per parameter)
    assert all(p.grad is None for p in model.net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, params(model)))


def test_schedule_free_validates_and_predicts_at_the_average_x(tmp_path):
    model = Net("sf")
    trainer = make_trainer(tmp_path, [GradkitCallback()], limit_val_batches=1)
    trainer.fit(model, loader(), val_dataloaders=loader())
    opt = model.optimizers().optimizer
    assert model.val_modes == [False, False] and opt.training  # eval for validation, back to train after
    y = params(model)
    probe = copy.deepcopy(model.net)
    probe_opt = gk.optim.ScheduleFreeAdamW(probe.parameters(), lr=5e-2, kernel="foreach")
    probe_opt.load_state_dict(opt.state_dict())
    probe_opt.eval()
    x = [p.detach() for p in probe.parameters()]
    # The last validation ran after the last step: it saw x, which is far from the training point y.
    for seen, xi in zip(model.val_snapshots[-1], x):
        torch.testing.assert_close(seen, xi, rtol=0, atol=1e-6)
    assert max((xi - yi).abs().max().item() for xi, yi in zip(x, y)) > 1e-3
    preds = torch.cat(trainer.predict(model, loader()))
    torch.testing.assert_close(preds, probe(X), rtol=0, atol=1e-5)
    assert opt.training


def test_without_the_callback_schedule_free_validates_at_y(tmp_path):
    model = Net("sf")
    make_trainer(tmp_path, limit_val_batches=1).fit(model, loader(), val_dataloaders=loader())
    assert model.val_modes == [True, True]
    for seen, yi in zip(model.val_snapshots[-1], params(model)):
        assert torch.equal(seen, yi)
