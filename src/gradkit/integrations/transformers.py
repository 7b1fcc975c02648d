"""Hugging Face ``Trainer``: zeroth-order fine-tuning with MeZO's recipe, gradkit stages in the checkpoint.

Install with ``pip install "gradkit[transformers]"``. Two pieces:

* :class:`ZOTrainer` — a ``transformers.Trainer`` that fine-tunes with forward passes only, following "Fine-Tuning
  Language Models with Just Forward Passes" (Malladi et al., 2023): by default the fused
  :class:`~gradkit.sources.ZOSGD` (the MeZO update, at inference memory), built from ``TrainingArguments``
  (``learning_rate``, ``weight_decay``, ``seed``, the LR schedule) with two parameter groups — weight decay on the
  weights, none on biases and LayerNorm parameters (the Trainer's own rule, ``get_decay_parameter_names``) — and
  dropout off while the losses are evaluated. ``source=`` swaps in any gradkit source (SPSA, ES, forward gradient,
  ...) that writes ``.grad`` for the Trainer's (first-order) optimizer instead.
* :class:`GradkitTrainerCallback` — saves gradkit stages (sources, transforms, controllers, pipelines) in each
  checkpoint directory and restores them on ``train(resume_from_checkpoint=...)``; leaves Schedule-Free optimizers
  at their averaged point x when training ends. (The Trainer itself already calls ``optimizer.eval()`` before
  evaluation and prediction and ``optimizer.train()`` before each training step, so gradkit's Schedule-Free
  optimizers, passed through ``optimizers=(opt, None)``, are evaluated at x.)

::

    from transformers import TrainingArguments
    from gradkit.integrations.transformers import ZOTrainer

    args = TrainingArguments("out", learning_rate=1e-6, weight_decay=0.0, max_steps=20_000,
                             lr_scheduler_type="constant", per_device_train_batch_size=16)
    ZOTrainer(model=model, args=args, train_dataset=ds, zo_eps=1e-3).train()

Gradient accumulation, defined. With ``gradient_accumulation_steps = N`` one ZO update is made per N micro-batches
(``trainer.state.global_step`` counts updates, as for backprop). The objective whose gradient is estimated is the
one backprop with the same accumulation would differentiate: at each perturbed point θ ± εz_k the loss is the sum
of the N micro-batch losses, each scaled exactly as ``Trainer.training_step`` scales it (divided by N, or normalised
by the window's token count when the model takes ``num_items_in_batch``). The N micro-batches therefore share the
same directions and the update equals one step on a batch N times larger (exactly, for equal micro-batches and a mean
loss); it costs 2·K·N forward passes. The micro-batches of a window are kept (as the Trainer prepared them) until the
window's last one arrives. Without this, calling ``ZOSGD.step`` in every ``training_step`` would silently make N
updates per optimizer step.

Through accelerate. The Trainer wraps the optimizer in accelerate's ``AcceleratedOptimizer``, whose ``step(closure)``
returns ``None``; the losses are recorded inside the closure instead, so the reported training loss is the mean of
the 2·K losses (per window) of each update.

Not covered: DeepSpeed and FSDP (sharded parameters: the perturbation is applied to whole parameter tensors) and
SageMaker model parallelism; under plain multi-process data parallelism ``ZOSGD`` follows its ``comm="auto"``
rule (directions split across ranks, see :mod:`gradkit.distributed`), which has not been tested through the Trainer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

try:
    import transformers
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError(
        "gradkit.integrations.transformers needs Hugging Face transformers: pip install 'gradkit[transformers]'",
        name=exc.name,
    ) from exc

from .._validate import check_int, check_positive
from ..sources.base import Source
from ..sources.zosgd import ZOSGD
from ._stages import collect_states, in_train_mode, is_schedule_free, restore_states

__all__ = ["STAGES_FILE", "GradkitTrainerCallback", "ZOTrainer"]

#: Name of the file holding gradkit stage states inside each ``checkpoint-<step>`` directory.
STAGES_FILE = "gradkit_stages.pt"


def _unwrap(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer) if optimizer is not None else None


class GradkitTrainerCallback(transformers.TrainerCallback):
    """Checkpoint gradkit stages with the ``Trainer``; leave Schedule-Free optimizers at x when training ends.

    On every save, the stages' states go to ``<output_dir>/checkpoint-<step>/gradkit_stages.pt`` (main process
    only). When training starts from a checkpoint (``trainer.state.global_step > 0`` at ``on_train_begin``), they are
    loaded from ``checkpoint_dir`` if set (``ZOTrainer`` sets it from ``train(resume_from_checkpoint=...)``), else
    from ``<output_dir>/checkpoint-<global_step>``; a missing file or a stage without saved state raises rather than
    silently restarting a stage (a restarted zeroth-order source would repeat its random directions).

    Optimizers the Trainer checkpoints itself (``optimizer.pt``; a fused ``ZOSGD`` included) are not saved here.

    Args:
        stages: The gradkit stages to checkpoint, by name (names must match between the saving and the resuming
            run). Default: none (only the Schedule-Free handling).
        schedule_free_eval_at_end: At ``on_train_end``, switch a Schedule-Free optimizer (anything with
            ``train()``/``eval()``) to ``eval()``, so the trained model — and ``trainer.save_model()`` — holds the
            averaged point x, the one the method evaluates. Default True.
    """

    def __init__(self, stages: Mapping[str, Any] | None = None, *, schedule_free_eval_at_end: bool = True):
        for name, stage in (stages or {}).items():
            if not (hasattr(stage, "state_dict") and hasattr(stage, "load_state_dict")):
                raise ValueError(f"stages[{name!r}] has no state_dict/load_state_dict: {type(stage).__name__}")
        self.stages = dict(stages or {})
        self.schedule_free_eval_at_end = bool(schedule_free_eval_at_end)
        self.checkpoint_dir: str | None = None

    def _skip(self, optimizer: Any) -> list[torch.optim.Optimizer]:
        inner = _unwrap(optimizer)
        return [inner] if inner is not None else []

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001 (TrainerCallback signature)
        if not self.stages or not args.should_save:
            return
        path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(path, exist_ok=True)
        torch.save(collect_states(self.stages, self._skip(kwargs.get("optimizer"))), os.path.join(path, STAGES_FILE))

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        if not self.stages or state.global_step == 0:
            return
        path = self.checkpoint_dir or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        file = os.path.join(path, STAGES_FILE)
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"resuming at step {state.global_step} but {file} does not exist: the gradkit stages "
                f"{sorted(self.stages)} would restart from scratch. Set GradkitTrainerCallback.checkpoint_dir to the "
                "checkpoint you resume from (ZOTrainer does this itself)."
            )
        restore_states(self.stages, torch.load(file, map_location="cpu", weights_only=False),
                       self._skip(kwargs.get("optimizer")))

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        opt = _unwrap(kwargs.get("optimizer"))
        if self.schedule_free_eval_at_end and is_schedule_free(opt) and in_train_mode(opt):
            opt.eval()


class ZOTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` for zeroth-order fine-tuning (MeZO's recipe) with any gradkit source.

    Default (``source=None``): the optimizer is a fused :class:`~gradkit.sources.ZOSGD` built by
    :meth:`create_optimizer` from the ``TrainingArguments`` — ``lr = learning_rate``, ``seed = seed``, weight decay
    ``weight_decay`` on the parameters the Trainer decays and 0 on biases and LayerNorm parameters — unless a
    ``ZOSGD`` is passed through ``optimizers=(zo, scheduler)``. Its step and seed travel in the Trainer's
    ``optimizer.pt``; LR schedulers work as for any optimizer.

    With ``source=`` (any :class:`~gradkit.sources.Source`, e.g. ``SPSA``): the source writes ``.grad`` from the
    same closure, ``transforms`` edit it, and the Trainer's own optimizer (its default AdamW, or a gradkit optimizer
    passed through ``optimizers=``) takes the step, after the Trainer's gradient clipping (``max_grad_norm``). The
    source's and transforms' states are saved in each checkpoint by a :class:`GradkitTrainerCallback` this trainer
    adds.

    See the module documentation for the gradient-accumulation semantics and the accelerate wrapper.

    Args:
        *args: Positional arguments of ``transformers.Trainer`` (``model``, ``args``, ...).
        source: A gradkit source that writes ``.grad`` for the Trainer's optimizer; ``None`` (default) uses the
            fused ``ZOSGD``.
        transforms: Gradient transforms applied after ``source`` (only with ``source=``). Default none.
        zo_eps: Perturbation scale ε of the default ``ZOSGD`` (MeZO: 1e-3). Default 1e-3.
        zo_directions: Number of directions K per step of the default ``ZOSGD`` (MeZO: 1). Default 1.
        zo_distribution: ``"gaussian"`` (MeZO) or ``"rademacher"`` directions for the default ``ZOSGD``.
        zo_exact_restore: Undo each perturbation bit-exactly (``ZOSGD``'s default) or as MeZO does (``False``:
            last-bit drift, no bookkeeping memory). Default True.
        zo_dropout: Keep dropout active while losses are evaluated. Default False (MeZO's recipe: the model is in
            ``eval()`` mode, so θ+εz and θ−εz see the same function and the difference measures the directional
            derivative, not two dropout masks).
        **kwargs: Keyword arguments of ``transformers.Trainer``.

    Raises:
        ValueError: a first-order optimizer is passed without ``source=``, a ``ZOSGD`` is passed together with
            ``source=``, ``transforms`` without ``source=``, or a bad ``zo_*`` value.
    """

    def __init__(self, *args: Any, source: Source | None = None, transforms: Iterable[Any] = (),
                 zo_eps: float = 1e-3, zo_directions: int = 1, zo_distribution: str = "gaussian",
                 zo_exact_restore: bool = True, zo_dropout: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.zo_eps = check_positive("zo_eps", zo_eps)
        self.zo_directions = check_int("zo_directions", zo_directions, 1)
        if zo_distribution not in ("gaussian", "rademacher"):
            raise ValueError(f"zo_distribution must be 'gaussian' or 'rademacher', got {zo_distribution!r}")
        self.zo_distribution = zo_distribution
        self.zo_exact_restore = bool(zo_exact_restore)
        self.zo_dropout = bool(zo_dropout)
        self.source = source
        self.transforms = list(transforms)
        if source is not None and not isinstance(source, Source):
            raise ValueError(f"source must be a gradkit Source, got {type(source).__name__}")
        if source is None and self.transforms:
            raise ValueError("transforms act on .grad, which the fused ZOSGD never writes: pass source= (e.g. SPSA)")
        if source is None and self.optimizer is not None and not isinstance(self.optimizer, ZOSGD):
            raise ValueError(f"{type(self.optimizer).__name__} needs a gradient: pass source= (e.g. "
                             "gk.sources.SPSA(model)), or no optimizer for the fused ZOSGD")
        if source is not None and isinstance(self.optimizer, Source):
            raise ValueError("pass either a zeroth-order optimizer (ZOSGD) or source=, not both")
        stages = {"source": source} if source is not None else {}
        stages.update({f"transforms.{i}": t for i, t in enumerate(self.transforms)})
        self.gradkit_callback = GradkitTrainerCallback(stages)
        self.add_callback(self.gradkit_callback)
        self._window: list[tuple[dict[str, Any], Any]] = []

    # -- optimizer ------------------------------------------------------------------------------------------------
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The fused ``ZOSGD`` with per-group weight decay (no decay on biases / LayerNorm), unless ``source=``.

        Args:
            model: The model to optimize (default: the Trainer's model).

        Returns:
            The optimizer (also stored as ``self.optimizer``).
        """
        if self.source is not None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        wd = float(self.args.weight_decay)
        if wd:
            groups = [{"params": [p for n, p in named if n in decay], "weight_decay": wd},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            params: Any = [g for g in groups if g["params"]]
        else:
            params = [p for _, p in named]  # one group: no decay anywhere
        self.optimizer = ZOSGD(params, lr=self.args.learning_rate, eps=self.zo_eps, n_directions=self.zo_directions,
                               seed=self.args.seed, distribution=self.zo_distribution,
                               exact_restore=self.zo_exact_restore)
        return self.optimizer

    # -- resume: tell the callback which checkpoint the stages come from ------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> transformers.trainer_utils.TrainOutput:
        """``Trainer.train``; also points the gradkit callback at the checkpoint being resumed.

        Args:
            resume_from_checkpoint: As for ``transformers.Trainer.train`` (a path, or True for the last checkpoint
                in ``output_dir``).
            *args: Further positional arguments of ``Trainer.train``.
            **kwargs: Further keyword arguments of ``Trainer.train``.

        Returns:
            What ``Trainer.train`` returns.
        """
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
        self.gradkit_callback.checkpoint_dir = path if isinstance(path, (str, os.PathLike)) else None
        self._window = []
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # -- one (micro-)step -----------------------------------------------------------------------------------------
    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """Keep the micro-batch; on a window's last one, estimate and (fused) apply one zeroth-order update.

        Args:
            model: The (possibly wrapped) model.
            inputs: One prepared micro-batch.
            num_items_in_batch: The window's item count (token-normalised losses), as the Trainer passes it.

        Returns:
            0 for a micro-batch that does not end its window; for the last, the mean of the losses the step
            evaluated (so the Trainer's logged loss is the mean per update).
        """
        model.train(self.zo_dropout)
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()  # a Schedule-Free optimizer fed by source=
        self._window.append((self._prepare_inputs(inputs), num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        window, self._window = self._window, []
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                or self.compute_loss_func is not None
        losses: list[torch.Tensor] = []

        def closure() -> torch.Tensor:
            total = None
            for batch, n_items in window:
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, dict(batch), num_items_in_batch=n_items)
                if self.args.n_gpu > 1:
                    loss = loss.mean()
                if not scaled:
                    loss = loss / len(window)
                total = loss if total is None else total + loss
            losses.append(total.detach())
            return total

        if self.source is None:
            # Through accelerate's wrapper (it gates the step on sync_gradients and drops the return value).
            self.optimizer.step(closure)
        else:
            self.source.estimate(closure)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            for t in self.transforms:
                t(params)
        model.train(self.zo_dropout)
        return torch.stack(losses).mean().to(self.args.device)
