"""``gradguard run``: guard an unmodified training script, leaving no trace on its objects.

Nothing in the script changes, and nothing of gradguard is put on the script's models or
optimizers: while :class:`ZeroCode` is active it listens through torch's *global* hooks and a few
wrapped torch functions, all restored on exit (and switched off in a forked child, such as a
DataLoader worker):

* a global module forward pre-hook and forward hook note each *root* module (one called while no
  other module's forward runs) and feed its :class:`~gradguard.locate.StepCapture` (the inputs a
  replay needs, the loss-code watch): nothing is registered on the module, so ``torch.save(model)``
  writes what a plain run writes;
* ``torch.autograd.backward`` (what ``loss.backward()`` calls) notes the loss: a step's loss is the
  sum of what was back-propagated since the last step (all micro-batches of gradient
  accumulation), unscaled when it came from ``GradScaler.scale``;
* ``torch.nn.utils.clip_grad_norm_`` / ``clip_grads_with_norm_`` / ``clip_grad_value_``: the step is
  measured *before* the script's own clip, so the run log has the true pre-clip norm, and the
  script's threshold and coefficient; ``--clip`` on the command line replaces the script's clip;
* ``GradScaler.step`` / ``GradScaler.scale``: a step under a GradScaler is measured on unscaled
  gradients, an fp16 overflow is the scaler's business (logged, not a non-finite step), the loss
  and the scale are logged;
* a global optimizer step pre-hook measures the steps not measured yet (a script without clipping)
  and enforces the guard's decision: a skipped step has its gradients dropped, so the script's
  own ``optimizer.step()`` leaves the parameters and the optimizer state untouched. A closure
  (LBFGS) is wrapped: its first evaluation is measured, and a bad one ends the step unchanged.

* ``Optimizer.add_param_group`` (how every optimizer is built): the optimizers are known before
  their first step, so a clip call or a backward can be matched to its optimizer.

A model updated by hand (``p.data.add_(p.grad, alpha=-lr)``, no optimizer) is measured after each
``backward()`` (from its second step on, at its clip when the script clips) by a monitor-only
:class:`~gradguard.Guard`, which locates a non-finite step before the script's update (one host read a
step, see ``Guard(locate=...)``); such a step cannot be skipped, which is said once.

A fused optimizer under a GradScaler is unscaled by the runner before ``GradScaler.step`` (as
``scaler.unscale_`` would; the scaler then gives the kernel no ``grad_scale``), so it is measured on
the true gradients with the same update. Two clip calls in one step (two parameter groups) are both
recorded: the row's threshold, coefficient and clip rate combine them
(:class:`gradguard._guard.callerclip.CallerClip`); the norm is the guard's, taken before either.

Under ``torchrun`` every rank runs its own runner; the guards reduce the norms across ranks (as a
:class:`~gradguard.Guard` does under DDP), rank 0 writes the run log, the summary and the report.

With several optimizers the first one's run log is ``out``, the k-th's ``out/optimizer<k>``;
every ``meta.json`` says which optimizer it holds (``optimizer``: index, class, the modules it
steps), the root's lists its ``children``, and every record and event has ``global_step``: the
optimizer steps measured before it in the process, all optimizers together.

The first non-finite or skipped step, and the first gradient-norm spike, are reported on stderr
as they happen, then at most every :data:`LIVE_EVERY_S` seconds while it lasts.

Example::

    with ZeroCode(out="runs/exp") as zc:
        runpy.run_path("train.py", run_name="__main__")
    print(zc.summary())

The package: :mod:`.script` (``gradguard run``), :mod:`.runner` (:class:`ZeroCode`; its parts
:mod:`._lookup`, :mod:`._steps`, :mod:`._clip`), :mod:`.patches` (the hooks and wrapped torch functions), :mod:`.sessions` (what is guarded),
:mod:`.live` (stderr while the script runs), :mod:`.frameworks` (Lightning's Trainer).
"""

from gradguard._guard.config import ROLLBACK_SETTINGS  # (for the command line, which imports no core module)
from gradguard.integrations.zerocode.live import LIVE_EVERY_S
from gradguard.integrations.zerocode.runner import ZeroCode
from gradguard.integrations.zerocode.script import check_options, run_script
from gradguard.integrations.zerocode.sessions import ManualUpdate

__all__ = ["LIVE_EVERY_S", "ROLLBACK_SETTINGS", "ManualUpdate", "ZeroCode", "check_options", "run_script"]
