"""How a step is applied: clip and step the optimizer, or skip — chosen once, at construction.

Each strategy is a callable ``apply(step, decide) -> Outcome``. ``step`` is what the guard planned
(:class:`Planned`); ``decide(step)`` is the guard's one host read (:meth:`gradguard.Guard._decide`
and the anomaly handling around it), which a strategy calls only when it needs the host.

* :class:`HostDecided`: one host read picks step or skip (the cost GradScaler pays on every
  unfused step). Also the external step (``Guard.before_step``: the caller steps) and the
  monitor-only ``raise`` mode (nothing stepped, a bad step raises).
* :class:`Fused`: a fused optimizer takes the coefficient and the skip flag through the
  ``grad_scale`` / ``found_inf`` protocol of GradScaler: the kernel itself skips, no host read.
  The first step of a fused momentum SGD is decided on the host instead (torch leaves its momentum
  buffers ``empty_like`` when that step is skipped).
* :class:`NeverSkip`: ``on_nonfinite="warn"``: nothing is skipped, so nothing is read; under a
  GradScaler overflows are skipped, by its ``under_scaler`` strategy.
* :class:`Observe`: monitor only, ``warn``: nothing is clipped, stepped or read.

On the CPU (``on_cpu``: every parameter a float32/float64 CPU tensor, :func:`branches_on_host`) a
host read waits for no device, and two strategies use it, with the same bits: a fused step the
flag does not skip is taken by a host branch instead of the kernel's protocol, which costs more
there (:func:`_fused_step`), and :class:`HostDecided`, which reads the skip flag anyway, leaves a
clip coefficient of 1 unapplied (:func:`_clip`). An unfused :class:`NeverSkip` step, which reads
nothing, stays so (saving one multiply is not worth the first read).

:func:`choose` picks one from the guard's settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from gradguard import clip
from gradguard._guard.config import GuardConfig
from gradguard._kernels import scale_grads_

__all__ = [
    "Apply",
    "Fused",
    "HostDecided",
    "NeverSkip",
    "Observe",
    "Outcome",
    "Planned",
    "branches_on_host",
    "choose",
    "reuse_first_call",
]


@dataclass
class Planned:
    """A measured, planned step, ready to apply."""

    grads: list[Tensor]  # the gradients present (this rank's shards under FSDP2)
    coef: Tensor | None  # the norm-clipping coefficient (None: no norm clipping)
    skip: Tensor  # the policy's skip flag (device bool)
    scaler: torch.amp.GradScaler | None
    clip_in_place: Callable[[], None]  # runs a value / AGC / per-layer clipper on the gradients
    closure: Callable[[], Any] | None = None  # guard.step(closure): passed to optimizer.step
    found_inf: Tensor | None = None  # ``skip`` as float32 where the guard has it already (its row)


def reuse_first_call(closure: Callable[[], Any], loss: Any) -> Callable[[], Any]:
    """The closure ``optimizer.step`` gets in ``guard.step(closure)``: its first call returns the loss
    the guard already computed (the gradients it measured, checked and clipped are in place);
    later calls (LBFGS's line search and inner iterations) run the closure again."""
    calls = 0

    def again() -> Any:
        nonlocal calls
        calls += 1
        return loss if calls == 1 else closure()

    return again


def _step_optimizer(optimizer: torch.optim.Optimizer, step: Planned) -> None:
    """``optimizer.step()``, with the closure when the caller gave one (LBFGS needs it)."""
    if step.closure is not None:
        optimizer.step(step.closure)
    else:
        optimizer.step()


class Outcome(NamedTuple):
    """Whether the step was skipped: a host bool when ``on_host``, else the device flag."""

    skipped: Tensor | bool
    on_host: bool


Decide = Callable[[Planned], bool]


class Apply(Protocol):
    """How a step is applied."""

    # the step waits for no device value: the outcome stays on the device, the host learns it at the
    # flush (a host read of a CPU value waits for nothing: ``on_cpu``)
    sync_free: bool

    def __call__(self, step: Planned, decide: Decide) -> Outcome: ...


def _update(scaler: torch.amp.GradScaler | None) -> None:
    if scaler is not None:
        scaler.update()  # lowers the scale after an overflow


def _clip(step: Planned, *, on_cpu: bool = False) -> None:
    """Clip in place: the in-place clipper, then the norm coefficient (``on_cpu``: a coefficient of 1,
    read on the host where that waits for no device, scales nothing: multiplying by 1 changes no bit)."""
    step.clip_in_place()
    # host sync: on_cpu only, a CPU value (no device to wait for)
    if step.grads and step.coef is not None and not (on_cpu and step.coef.is_cpu and float(step.coef) == 1.0):
        scale_grads_(step.grads, step.coef)  # CUDA: the Triton kernel where it reads them (_kernels)


def branches_on_host(params: Sequence[Tensor]) -> bool:
    """Whether a step over ``params`` may read its flag and coefficient on the host (``on_cpu``):
    every parameter a float32/float64 CPU tensor (there :func:`_fused_step`'s division equals the
    kernel's bit for bit; a reduced-precision gradient would be rounded before the kernel reads it).
    Chosen at construction and when parameters join; each read also checks that its value is still
    on the CPU (a model moved to a GPU since takes the device path: no host sync)."""
    return (
        not clip._PIN_DEVICE_PATH  # (tests: the device path on the CPU too)
        and bool(params)
        and all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in params)
    )


def _grad_scale(coef: Tensor) -> Tensor:
    """The fused kernels' ``grad_scale`` of a clip coefficient: its float32 reciprocal."""
    scale = coef.reciprocal()
    return scale if scale.dtype is torch.float32 else scale.float()


def _fused_step(optimizer: torch.optim.Optimizer, step: Planned, *, on_cpu: bool = False) -> None:
    """The GradScaler protocol: the kernel divides the gradients by ``grad_scale``, skips on ``found_inf``.

    ``on_cpu`` (:func:`branches_on_host`): a step the flag does not skip is taken by a host branch
    instead, with the same result bit for bit: the gradients divided by the same ``grad_scale``
    (not at all when the coefficient is 1), then a plain ``optimizer.step()``; a skipped step (rare)
    goes through ``found_inf`` as on a GPU. On the CPU the read waits for no device, and the
    kernel's protocol costs more than the branch (fused AdamW, one thread, min of 9×2000 steps,
    coefficient 1: a 2×32 MLP 58 µs under the protocol, 47 plain, 53.5 with a multiply; 4×256: 227,
    182, 207). The step's outcome stays the device flag: the host learns of a skipped step at the
    flush, as with the kernel.
    """
    if on_cpu and step.skip.is_cpu and not bool(step.skip):  # host sync: a CPU value, no device to wait for
        step.clip_in_place()
        if step.grads and step.coef is not None and float(step.coef) != 1.0:  # host sync: a CPU value
            torch._foreach_div_(step.grads, _grad_scale(step.coef))  # what the kernel does with grad_scale
        _step_optimizer(optimizer, step)
        return
    step.clip_in_place()
    if step.coef is not None:
        optimizer.grad_scale = _grad_scale(step.coef)  # type: ignore[attr-defined]
    found_inf = step.found_inf if step.found_inf is not None else step.skip.to(torch.float32)
    optimizer.found_inf = found_inf  # type: ignore[attr-defined]
    try:
        _step_optimizer(optimizer, step)
    finally:
        optimizer.__dict__.pop("grad_scale", None)
        del optimizer.found_inf  # type: ignore[attr-defined]


class HostDecided:
    """One host read decides; a taken step is clipped, stepped (``steps``) and the scaler updated.

    ``steps=False``: the caller steps the optimizer (``Guard.before_step``). ``clips=False`` and
    ``updates_scaler=False``: monitor only, the caller clips, steps and updates its scaler itself.
    ``on_cpu``: see :func:`_clip`.
    """

    sync_free = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        steps: bool = True,
        clips: bool = True,
        updates_scaler: bool = True,
        on_cpu: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.steps, self.clips, self.updates_scaler = steps, clips, updates_scaler
        self.on_cpu = on_cpu

    def __call__(self, step: Planned, decide: Decide) -> Outcome:
        skipped = decide(step)  # the one host read (and, on a bad step, the anomaly path)
        if not skipped:
            if self.clips:
                _clip(step, on_cpu=self.on_cpu)
            if self.steps:
                _step_optimizer(self.optimizer, step)
        if self.updates_scaler:
            _update(step.scaler)  # after a skip too: the scaler learns of an overflow
        return Outcome(skipped, on_host=True)


class Fused:
    """Sync-free: clip and skip go into the fused kernel (``grad_scale`` / ``found_inf``); ``on_cpu``:
    a step not skipped is taken by a host branch, same result (:func:`_fused_step`)."""

    sync_free = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        momentum_sgd: bool,
        host: HostDecided,
        on_cpu: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.momentum_sgd = momentum_sgd
        self.host = host
        self.on_cpu = on_cpu  # the host branch of _fused_step

    def _first_momentum_step(self) -> bool:
        """Fused SGD skipping its first step leaves ``empty_like`` momentum buffers: that one goes to the host.

        torch's own test (``_fused_sgd``'s ``is_first_step``), group by group: no parameter with a
        gradient has a momentum buffer yet. It stops at the first buffer it finds, so a step after
        the first reads one state a group (a scan of every parameter's state cost ~0.1 µs a tensor,
        30 µs a step on 291 tensors); a state reset by the user (``opt.state[p] = {}``, a new
        ``state`` dict, ``load_state_dict``) is seen at once: nothing is remembered across steps."""
        if not self.momentum_sgd:
            return False
        state = self.optimizer.state
        return any(_no_momentum_buffer(group["params"], state) for group in self.optimizer.param_groups)

    def __call__(self, step: Planned, decide: Decide) -> Outcome:
        if self._first_momentum_step():
            return self.host(step, decide)
        _fused_step(self.optimizer, step, on_cpu=self.on_cpu)
        _update(step.scaler)
        return Outcome(step.skip, on_host=False)


def _no_momentum_buffer(params: Sequence[Tensor], state: Any) -> bool:
    """Whether none of ``params`` that has a gradient has a momentum buffer, and one has a gradient
    (torch's first momentum step of a group). ``state`` is read without adding entries."""
    with_grad = False
    for p in params:
        if p.grad is None:
            continue
        if state.get(p, _NO_STATE).get("momentum_buffer") is not None:
            return False
        with_grad = True
    return with_grad


_NO_STATE: dict[str, Any] = {}


class NeverSkip:
    """Sync-free: nothing is skipped, so every step is clipped and taken without a device read.

    Under a GradScaler an overflow is skipped (the scaler's business): ``under_scaler`` applies it.
    """

    sync_free = True

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, fused: bool, under_scaler: Apply, on_cpu: bool = False
    ) -> None:
        self.optimizer = optimizer
        self.fused = fused
        self.under_scaler = under_scaler
        self.on_cpu = on_cpu  # the host branch of _fused_step

    def __call__(self, step: Planned, decide: Decide) -> Outcome:
        if step.scaler is not None:
            return self.under_scaler(step, decide)
        if self.fused:
            _fused_step(self.optimizer, step, on_cpu=self.on_cpu)  # the coefficient folded into the kernel
        else:
            _clip(step)  # (no read here, where nothing else reads: see the module docstring)
            _step_optimizer(self.optimizer, step)
        return Outcome(step.skip, on_host=False)


class Observe:
    """Monitor only (``warn``): measure and log; nothing is clipped, stepped or read on the host."""

    sync_free = True

    def __call__(self, step: Planned, decide: Decide) -> Outcome:
        return Outcome(step.skip, on_host=False)


def choose(
    config: GuardConfig,
    optimizer: torch.optim.Optimizer,
    *,
    fused: bool,
    momentum_sgd: bool,
    on_cpu: bool = False,
) -> Apply:
    """The strategy of ``Guard.step`` for these settings (:func:`choose_external`: of ``before_step``);
    ``on_cpu``: flag and coefficient may be read on the host (:func:`branches_on_host`)."""
    if config.monitor_only:
        return _monitor(config, optimizer)
    host = HostDecided(optimizer, on_cpu=on_cpu)
    if config.on_nonfinite in ("rollback", "raise"):
        return host  # a bad step needs the host at once
    fused_apply = Fused(optimizer, momentum_sgd=momentum_sgd, host=host, on_cpu=on_cpu) if fused else None
    if config.on_nonfinite == "warn" and config.on_spike != "skip":
        return NeverSkip(optimizer, fused=fused, under_scaler=fused_apply or host, on_cpu=on_cpu)
    return fused_apply or host


def choose_external(config: GuardConfig, optimizer: torch.optim.Optimizer, *, on_cpu: bool = False) -> Apply:
    """The strategy of ``Guard.before_step``: decided on the host, clipped in place, stepped by the caller."""
    if config.monitor_only:
        return _monitor(config, optimizer)
    # (the caller updates its scaler)
    return HostDecided(optimizer, steps=False, updates_scaler=False, on_cpu=on_cpu)


def _monitor(config: GuardConfig, optimizer: torch.optim.Optimizer) -> Apply:
    if config.on_nonfinite == "raise":  # a bad step raises: the host must know at once
        return HostDecided(optimizer, steps=False, clips=False, updates_scaler=False)
    return Observe()
