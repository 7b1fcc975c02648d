"""PyTorch Lightning: checkpoint every gradkit stage, evaluate Schedule-Free optimizers at x, train with any source.

Install with ``pip install "gradkit[lightning]"``. Two pieces:

* :class:`GradkitCallback` — saves the state of every gradkit stage the ``LightningModule`` holds (a
  :class:`~gradkit.Pipeline`, gradient sources, transforms, controllers, searchers) inside Lightning's checkpoint and
  restores it on ``fit(ckpt_path=...)``, so a resumed run continues bit for bit (a resumed SPSA source does not
  repeat its random directions); switches Schedule-Free optimizers to ``eval()`` (the averaged point x) for
  validation, test and predict and back to ``train()`` afterwards; logs ``Pipeline.stats`` every step; and refuses
  a zeroth-order optimizer under automatic optimization before it could run a single backward pass.
* :func:`gradkit_step` — one training step with any gradient source under Lightning's *manual* optimization
  (``self.automatic_optimization = False``): runs ``pipe.step(closure)`` (or ``ZOSGD.step(closure)``) and counts
  the step in ``trainer.global_step``, so ``max_steps``, checkpoint intervals and LR-scheduler bookkeeping work.

::

    import lightning as L
    import gradkit as gk
    from gradkit.integrations.lightning import GradkitCallback, gradkit_step

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False          # gradkit's source computes the gradient
            self.net = torch.nn.Linear(10, 1)

        def configure_optimizers(self):
            self.pipe = gk.Pipeline(gk.sources.SPSA(self.net, n_directions=4, seed=0),
                                    optimizer=gk.optim.AdamW(self.net.parameters(), lr=1e-2))
            return self.pipe.optimizer                   # Lightning checkpoints it and counts its steps

        def training_step(self, batch, batch_idx):
            x, y = batch
            return gradkit_step(self, self.pipe, lambda: F.mse_loss(self.net(x), y))

    L.Trainer(max_epochs=2, callbacks=[GradkitCallback()]).fit(Model(), loader)

Why manual optimization. Lightning's automatic optimization hands the optimizer a closure that runs
``training_step`` *and* ``backward`` with gradients enabled. A gradkit source evaluates the objective itself (a
zeroth-order source many times, under ``torch.no_grad``), so it needs the bare objective: that is what the closure
given to :func:`gradkit_step` is. First-order gradkit optimizers (``gk.optim.AdamW``, ``Lion``, Schedule-Free, ...)
need none of this: return them from ``configure_optimizers`` as any torch optimizer.

Limits: ``gradkit_step`` bypasses Lightning's precision plugin, so ``precision="16-mixed"`` (a ``GradScaler``) is
not supported (``"bf16-mixed"`` autocast and ``"32-true"`` are); a Schedule-Free checkpoint stores the training
point y with the optimizer state (as the ``schedulefree`` package does), so a checkpoint evaluated in a fresh
process is at y unless its optimizer is restored and switched with ``eval()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError(
        "gradkit.integrations.lightning needs PyTorch Lightning: pip install 'gradkit[lightning]'", name=exc.name
    ) from exc

from ..logging import flatten_stats
from ..pipeline import Pipeline
from ..sources.base import Source
from ._stages import collect_states, find_stages, in_train_mode, is_schedule_free, is_zeroth_order, restore_states

__all__ = ["AUTOMATIC_OPTIMIZATION_MESSAGE", "GradkitCallback", "gradkit_step"]

#: The error raised when a zeroth-order optimizer meets Lightning's automatic optimization.
AUTOMATIC_OPTIMIZATION_MESSAGE = (
    "{name} estimates its step from loss values only, but Lightning's automatic optimization hands it a closure "
    "that also runs backward() with gradients enabled: every evaluation would back-propagate (more costly than "
    "backprop, with none of the memory benefit). Use manual optimization: set `self.automatic_optimization = False` "
    "in your LightningModule and call `gradkit.integrations.lightning.gradkit_step(self, optimizer_or_pipeline, "
    "closure)` in training_step, where closure() returns the loss and never calls backward()."
)

_CHECKPOINT_KEY = "gradkit"


def _lightning_optimizer(module: pl.LightningModule, optimizer: torch.optim.Optimizer):
    opts = module.optimizers(use_pl_optimizer=True)
    opts = opts if isinstance(opts, list) else [opts]
    for lopt in opts:
        if getattr(lopt, "optimizer", lopt) is optimizer:
            return lopt
    raise ValueError(
        f"{type(optimizer).__name__} is not one of the optimizers returned by configure_optimizers: return it (for a "
        "Pipeline, `return self.pipe.optimizer`) so that Lightning checkpoints it, schedules its learning rate and "
        "counts its steps"
    )


def gradkit_step(module: pl.LightningModule, stepper: Pipeline | torch.optim.Optimizer,
                 closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One training step of ``stepper`` on ``closure`` under Lightning's manual optimization.

    ``stepper`` is a :class:`~gradkit.Pipeline` (any gradient source, transforms, optimizer, controllers) or a
    closure optimizer such as :class:`~gradkit.sources.ZOSGD`; its optimizer must be one of those returned by
    ``configure_optimizers``. The step is counted in ``trainer.global_step`` exactly as
    ``LightningOptimizer.step`` counts one. Learning-rate schedulers are stepped by the user under manual
    optimization (``self.lr_schedulers().step()``), as Lightning documents.

    Args:
        module: The ``LightningModule`` whose ``training_step`` is running; it must set
            ``self.automatic_optimization = False``.
        stepper: A ``gk.Pipeline``, or an optimizer whose ``step(closure)`` evaluates the closure itself
            (``gk.sources.ZOSGD``, or any torch optimizer: its closure must then call ``backward`` itself).
        closure: Zero-argument callable returning the scalar loss; for a Pipeline or a zeroth-order optimizer it
            must not call ``backward``.

    Returns:
        The loss (detached) as returned by ``stepper.step``.

    Raises:
        RuntimeError: ``module`` uses automatic optimization.
        ValueError: the stepper's optimizer is not one of the module's optimizers.
    """
    if module.automatic_optimization:
        raise RuntimeError(
            "gradkit_step runs the gradient source itself: set `self.automatic_optimization = False` in the "
            "LightningModule's __init__ (Lightning's automatic optimization would also run backward())"
        )
    optimizer = stepper.optimizer if isinstance(stepper, Pipeline) else stepper
    lopt = _lightning_optimizer(module, optimizer)
    # LightningOptimizer.step brackets the optimizer step with these two hooks (step progress, profiler); the
    # Pipeline steps its optimizer itself, so the bracket goes around the whole Pipeline step.
    before, after = getattr(lopt, "_on_before_step", None), getattr(lopt, "_on_after_step", None)
    if not (callable(before) and callable(after)):
        raise RuntimeError(f"lightning {pl.__version__}: LightningOptimizer has no step-progress hooks; "
                           "gradkit_step supports Lightning 2.x")
    before()
    loss = stepper.step(closure)
    after()
    return loss.detach() if isinstance(loss, torch.Tensor) else loss


class GradkitCallback(pl.Callback):
    """Checkpoints gradkit stages with Lightning, evaluates Schedule-Free optimizers at x, logs Pipeline stats.

    Stages are found on the ``LightningModule`` by attribute (``self.pipe``, ``self.source``,
    ``self.transforms[0]`` ...; see :func:`gradkit.integrations._stages.find_stages`) when a checkpoint is saved and
    when training starts, so stages built in ``configure_optimizers`` are found too; ``stages=`` adds or names
    others explicitly. Their states go under ``checkpoint["gradkit"]``, keyed by name. An optimizer Lightning
    already checkpoints (returned by ``configure_optimizers``) is not saved twice: a Pipeline's optimizer state is
    taken from Lightning's copy, and a ``ZOSGD`` returned as the optimizer carries its own step and seed.

    Restoring happens at ``on_train_start``, after Lightning has restored the model, optimizers and schedulers; a
    stage without saved state (or a saved state without a stage) raises ``ValueError`` naming it.

    Schedule-Free optimizers (anything with ``train()``/``eval()``, such as ``gk.optim.ScheduleFreeAdamW`` or the
    ``schedulefree`` package's) are switched to ``eval()`` at the start of validation, test and predict, and back to
    ``train()`` at their end (and on an exception), so metrics are computed at the averaged point x, where the method
    says the model is good, rather than at the interpolation y where gradients are taken.

    Args:
        stages: Extra stages by name (added to those found on the module; an explicit name wins).
        log_stats: Log every Pipeline's ``stats`` (transform statistics) and ``skipped`` count each training step
            with ``LightningModule.log_dict``, keyed ``"<pipeline attribute>/<statistic>"``. Default True.
        schedule_free: Switch Schedule-Free optimizers to ``eval()`` for validation / test / predict. Default True.
        find: Discover stages on the module by attribute; ``False`` uses ``stages`` only. Default True.

    Raises:
        RuntimeError: at ``fit`` start, when a zeroth-order optimizer (one that is also a gradkit ``Source``, e.g.
            ``ZOSGD``) is used with automatic optimization: see :data:`AUTOMATIC_OPTIMIZATION_MESSAGE`.
    """

    def __init__(self, stages: Mapping[str, Any] | None = None, *, log_stats: bool = True,
                 schedule_free: bool = True, find: bool = True):
        super().__init__()
        for name, stage in (stages or {}).items():
            if not (hasattr(stage, "state_dict") and hasattr(stage, "load_state_dict")):
                raise ValueError(f"stages[{name!r}] has no state_dict/load_state_dict: {type(stage).__name__}")
        self.stages = dict(stages or {})
        self.log_stats = bool(log_stats)
        self.schedule_free = bool(schedule_free)
        self.find = bool(find)
        self._pending: dict[str, Any] | None = None
        self._switched: list[torch.optim.Optimizer] = []
        self._known_optimizers: list[torch.optim.Optimizer] = []

    # -- stages and checkpoints ---------------------------------------------------------------------------------
    def _stages(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        found = find_stages(pl_module) if self.find else {}
        ids = {id(s) for s in self.stages.values()}
        return {**{k: v for k, v in found.items() if id(v) not in ids}, **self.stages}

    @staticmethod
    def _optimizers(trainer: pl.Trainer) -> list[torch.optim.Optimizer]:
        return [getattr(o, "optimizer", o) for o in trainer.optimizers]

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = collect_states(self._stages(pl_module), self._optimizers(trainer))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Stages built in configure_optimizers do not exist yet: keep the states until on_train_start.
        self._pending = checkpoint.get(_CHECKPOINT_KEY, {})

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.automatic_optimization:
            for opt in self._optimizers(trainer):
                if is_zeroth_order(opt) or isinstance(opt, Source):
                    raise RuntimeError(AUTOMATIC_OPTIMIZATION_MESSAGE.format(name=type(opt).__name__))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._known_optimizers = self._optimizers(trainer)
        if self._pending is not None:
            restore_states(self._stages(pl_module), self._pending, self._optimizers(trainer))
            self._pending = None

    # -- logging ------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.log_stats:
            return
        flat: dict[str, float] = {}
        for name, stage in self._stages(pl_module).items():
            if isinstance(stage, Pipeline):
                flat.update({f"{name}/{k}": v for k, v in flatten_stats(stage.stats).items()})
                flat[f"{name}/skipped"] = float(stage.skipped)
        if flat:
            pl_module.log_dict(flat, on_step=True, on_epoch=False, batch_size=1)

    # -- Schedule-Free: evaluate at x -----------------------------------------------------------------------------
    def _to_eval(self, trainer: pl.Trainer) -> None:
        if not self.schedule_free:
            return
        opts = self._optimizers(trainer) or self._known_optimizers
        for opt in opts:
            if is_schedule_free(opt) and in_train_mode(opt) and opt not in self._switched:
                opt.eval()
                self._switched.append(opt)

    def _to_train(self) -> None:
        while self._switched:
            self._switched.pop().train()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_eval(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_train()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_eval(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_train()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_eval(trainer)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_train()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._to_train()
