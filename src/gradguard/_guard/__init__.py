"""The parts of :class:`gradguard.Guard`, each in its own module with its own tests.

The guard's step reads top to bottom over them (see :meth:`gradguard.guard.Guard._step`):

* :mod:`.config` — the validated settings (:class:`~.config.GuardConfig`), the checks of the
  parameters, the default per-layer cadence;
* :mod:`.params` — the guarded parameters, and those that join later (unfrozen, or added with
  ``optimizer.add_param_group``), found without a scan of the parameters per step;
* :mod:`.measure` — **measure**: gradient norms, loss and non-finite flags (one read of the
  gradients, one all-reduce under torch.distributed), weight norms and update ratios;
* :mod:`.clipping` — **plan the clip**: the threshold and coefficient of norm clippers and of the
  spike detector, the in-place clippers (value, AGC, per-layer), the host spike detector;
* :mod:`.row` — the step's device row, in :data:`gradguard.record.SCALARS` order;
* :mod:`.apply` — **apply**: how a step is applied (fused ``found_inf``/``grad_scale``, decided on
  the host, never skipped, left to the caller, monitor only), chosen once at construction;
* :mod:`.poststep` — the work of a ``before_step`` step that waits for the caller's optimizer step
  (update ratios, the ``rollback`` snapshot), run by a step post-hook;
* :mod:`.counters` — the step counters, changed in one place;
* :mod:`.anomaly` — anomaly handling: capture of the step's inputs, replay, arming the next
  forward, locating, the ``nonfinite`` event of a step (once);
* :mod:`.recovery` — snapshots, rollback, LR back-off, and the bounds that stop a rollback loop
  (``max_rollbacks``, ``min_lr``);
* :mod:`.flush` — **record** (host side): the events and counters of the steps the host learns of
  at a flush;
* :mod:`.runmeta` — the run's ``meta.json`` and its run log.

Events are built by :mod:`gradguard.events`, record fields named by :mod:`gradguard.record`.
"""
