"""Drop gradguard into the frameworks people train with; each lives in its own module.

Importing this package imports no framework. Each integration is one import and one line:

* Lightning: ``Trainer(callbacks=[gradguard.integrations.lightning.GradGuard()])``
  (``pip install "gradguard[lightning]"``).
* Hugging Face: ``GradGuardTrainer(model=..., args=..., train_dataset=...)`` in place of ``Trainer``, or
  ``callbacks=[GradGuardCallback()]`` to only monitor (``pip install "gradguard[transformers]"``);
  both in :mod:`gradguard.integrations.transformers`.
* TensorBoard and Weights & Biases: ``attach(guard, TensorBoardSink("runs/tb"))`` in
  :mod:`gradguard.integrations.sinks` (``pip install "gradguard[tensorboard]"`` / ``"gradguard[wandb]"``).

The run directory stays the source of truth: sinks and framework loggers receive copies of the
records that the guard writes there, at its flush cadence (``every=N`` steps).
"""

__all__: list[str] = []
