"""Glue for the frameworks users train with. Each submodule is an optional extra; ``import gradkit`` imports none.

* :mod:`gradkit.integrations.lightning` (``pip install "gradkit[lightning]"``): a callback that checkpoints every
  gradkit stage with Lightning's checkpoint, evaluates Schedule-Free optimizers at their averaged point and logs
  ``Pipeline.stats``; :func:`~gradkit.integrations.lightning.gradkit_step` trains a ``LightningModule`` with any
  gradient source under manual optimization.
* :mod:`gradkit.integrations.transformers` (``pip install "gradkit[transformers]"``): ``ZOTrainer``, zeroth-order
  fine-tuning with the Hugging Face ``Trainer`` following MeZO's recipe, and a callback that checkpoints gradkit
  stages and evaluates Schedule-Free optimizers at their averaged point.
* :mod:`gradkit.integrations.diffusers` (``pip install "gradkit[diffusers]"``): diffusers flow networks as
  ``gk.guide`` models, and gradkit's guidance rules as diffusers guiders.
"""

__all__: list[str] = []
