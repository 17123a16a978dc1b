"""Plan the clip of a step, and clip in place.

:meth:`Clipping.plan` composes the step's norm threshold from the norm clipper and, under
``on_spike="clip"``, the spike detector (the smaller wins), and the coefficient that goes into the
step (folded into the fused kernel or scaled in). Value, AGC and per-layer clippers act on the
gradients themselves: :meth:`Clipping.in_place`, which the apply strategy runs on a step it takes.

What the clipper did reaches the record as ``clip_fraction``: for a norm clipper whether its one
coefficient is < 1 (the host derives it from the row's ``clip_coef``: :attr:`ClipPlan.fraction_from_coef`),
for the others the fraction their ``clip_`` returns, NaN without a clipper. The coefficient is
written straight into the step's row where it has one (:meth:`Clipping.plan`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradguard import _step_kernel
from gradguard._guard.measure import Constants, Measurement
from gradguard.clip import (
    AutoClip,
    Clipper,
    HostZClip,
    Norm,
    NormClipper,
    ZClip,
    coefficient,
    fraction_clipped,
    host_coefficient,
)

__all__ = ["ClipPlan", "Clipping", "reports_fraction", "spike_detector"]


class ClipPlan(NamedTuple):
    """The clip of one step (device tensors)."""

    coef: Tensor | None  # the norm-clipping coefficient (None: no norm clipping this step)
    threshold: Tensor | None  # τ
    spike: Tensor  # the norm is a spike (device detector; False otherwise)
    fraction: Tensor | None  # clip_fraction as measured (a bool or a float); None: see below, or in_place
    #: without a ``fraction``: the clip fraction is whether the one coefficient is < 1, which the
    #: host derives from the row's ``clip_coef`` (no device op; :data:`gradguard.record.DERIVED`)
    fraction_from_coef: bool = False


def spike_detector(on_spike: str, spike_z: float) -> ZClip | HostZClip | None:
    """Spikes that act on the step (``clip``, ``skip``) are found on the device; ``warn`` only logs
    them, so its z-score runs on the host at flush, over the norms the flush copies anyway."""
    if on_spike in ("clip", "skip"):
        return ZClip(z_thresh=float(spike_z))
    if on_spike == "warn":
        return HostZClip(float(spike_z))
    return None


def _fixed_threshold(clipper: NormClipper) -> float | None:
    """The threshold of a :class:`Norm` clipper with a number ``max_norm`` (what its ``threshold``
    returns, whatever the norm: made once as a device constant, and no norm to observe); ``None``
    for the clippers whose threshold is a tensor or follows the norms."""
    if isinstance(clipper, Norm) and type(clipper).threshold is Norm.threshold:
        max_norm = clipper.max_norm
        return (
            None if isinstance(max_norm, Tensor) else max_norm if type(max_norm) is float else float(max_norm)
        )
    return None


def _own_rule(clipper: NormClipper) -> bool:
    """Whether the clipper's threshold is gradguard's own rule: never negative by construction, ZClip's and auto's (a mean
    of norms plus a positive offset, or caps made of norms, losses > 0 and learning rates, which torch's
    optimizers refuse below 0; inf) and AutoClip's (a percentile of norms), as these classes compute it
    (a subclass's own ``threshold`` promises nothing; a loaded state's mean and count are clamped into
    range) — the coefficient then needs no clamp at 0: 1 op fewer —, and the norm it is given is only
    read (``Measurement.observed(read_only=True)`` may hand it the measured total itself)."""
    own = type(clipper).threshold
    return (isinstance(clipper, ZClip) and own is ZClip.threshold) or (
        isinstance(clipper, AutoClip) and own is AutoClip.threshold
    )


def reports_fraction(clipper: Clipper | None) -> bool:
    """Whether an in-place clipper says what it did: its ``clip_`` returns the fraction of its units
    clipped. A clipper written before ``clip_`` existed is called as before; its fraction is NaN."""
    return clipper is not None and type(clipper).clip_ is not Clipper.clip_


class Clipping:
    """The clipper and the device spike detector of a guard.

    Args:
        clipper: the guard's clipper (``None``: no clipping).
        spike: the spike detector (only a device :class:`ZClip` plays a part in the plan).
        clip_spikes: ``on_spike="clip"``: a spike's threshold caps the step's threshold.
        named: the guarded ``(name, parameter)`` pairs (AGC and per-layer clippers use the names).
        optimizer: the optimizer that steps them; the clipper is bound to it
            (:meth:`gradguard.clip.Clipper.attach`: ``auto`` reads its learning rate every step).
    """

    def __init__(
        self,
        clipper: Clipper | None,
        spike: ZClip | HostZClip | None,
        clip_spikes: bool,
        named: Sequence[tuple[str, Tensor]],
        consts: Constants,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.clipper = clipper
        if clipper is not None and optimizer is not None:
            clipper.attach(optimizer)
        self.spike = spike if isinstance(spike, ZClip) else None
        self.clip_spikes = clip_spikes
        self.named = named
        self.consts = consts
        self.norm_clipper = clipper if isinstance(clipper, NormClipper) else None
        self.norm = self.norm_clipper is not None
        self._fraction = reports_fraction(clipper)
        self._maybe_fixed = isinstance(clipper, Norm) and type(clipper).threshold is Norm.threshold
        self._fixed_constant: Tensor | None = None  # the device constant of the last fixed threshold
        # every threshold that makes the step's is ≥ 0 by construction (see _nonnegative)
        makers = [c for c in (self.norm_clipper, self.spike if clip_spikes else None) if c is not None]
        self._nonnegative = bool(makers) and all(_own_rule(c) for c in makers)
        self._reads_only = self.norm_clipper is not None and _own_rule(self.norm_clipper)
        self._host_value = self._reads_only and isinstance(clipper, ZClip)  # its τ may be a host float

    def plan(self, m: Measurement) -> ClipPlan:
        """The threshold (the smaller of the clipper's and, under ``clip_spikes``, the spike's),
        the coefficient and the spike flag of this step (no host read)."""
        threshold: Tensor | None = None
        spike = self.consts.false(m.device)
        if self.spike is not None:
            spike_tau = self.spike.threshold(m.observed(self.consts, read_only=True))
            spike = spike_tau < math.inf
            if self.clip_spikes:
                threshold = spike_tau
        if self.norm_clipper is not None:
            if self.norm_clipper.takes_loss:  # the loss as measured (0 without one: no loss-based cap)
                loss = m.column("loss")  # (the row's view, made once per row; else a view of the values)
                self.norm_clipper.observe_loss(m.values[0] if loss is None else loss)
            tau = self._threshold(m)
            threshold = tau if threshold is None else threshold.minimum(tau)
        if threshold is None:
            return ClipPlan(None, None, spike, self.fraction(None))
        coef, threshold = self._coefficient(m, threshold)
        if self.norm and coef.dim() == 0:  # the fraction is whether it is < 1: the host tells
            return ClipPlan(coef, threshold, spike, None, fraction_from_coef=True)
        return ClipPlan(coef, threshold, spike, self.fraction(coef))

    def _coefficient(self, m: Measurement, threshold: Tensor) -> tuple[Tensor, Tensor]:
        """The clip coefficient, in the row's column where it has one: on the host (a CPU step, no op),
        in one launch (a GPU, :mod:`gradguard._step_kernel`: an adaptive threshold written into the row
        with it, and returned as the row's column), or as :func:`gradguard.clip.coefficient`'s ops."""
        nonnegative = self._nonnegative or threshold is self._fixed_constant  # ≥ 0: no clamp at 0
        out = m.column("clip_coef") if m.total.dtype == torch.float32 and threshold.numel() == 1 else None
        if out is not None and m.host is not None and threshold.is_cpu:  # a CPU step: on the host, no op
            value = float(threshold)  # host sync: a CPU value
            return m.put("clip_coef", host_coefficient(m.host[1], value, nonnegative=nonnegative)), threshold
        eps = m.finite_eps()  # the step's finiteness test made it: 1 op fewer
        if out is not None and eps is not None and _step_kernel.takes_coefficient(m.total, threshold):
            into = m.column("threshold")
            put = into if not self.consts.made(threshold) and threshold is not into else None
            if _step_kernel.coefficient(m.total, threshold, eps, out, put, nonnegative):
                return out, threshold if put is None else put
        return coefficient(m.total, threshold, finite_eps=eps, nonnegative=nonnegative, out=out), threshold

    def _threshold(self, m: Measurement) -> Tensor:
        """The norm clipper's τ for this step: a fixed ``Norm`` threshold is a device constant, made
        once (it observes no norm); the others observe the step's norm."""
        assert self.norm_clipper is not None
        fixed = _fixed_threshold(self.norm_clipper) if self._maybe_fixed else None  # (max_norm may change)
        if fixed is not None:
            tau = self.consts.number(fixed, m.device)
            # (a NaN set by hand on the clipper is not a checked number: the coefficient tests it)
            self._fixed_constant = tau if fixed == fixed else None
            return tau
        observed = m.observed(self.consts, read_only=self._reads_only)
        if self._host_value and m.host is not None:  # ZClip's or auto's rule: a float on a CPU step
            tau = self.norm_clipper._threshold_value(observed)  # type: ignore[attr-defined]
            return m.put("threshold", tau) if isinstance(tau, float) else tau.to(m.device)  # (no op)
        return self.norm_clipper.threshold(observed).to(m.device)

    def fraction(self, coef: Tensor | None) -> Tensor | None:
        """A norm clipper's ``clip_fraction``: whether it scaled the gradients down, as the 0-D
        bool ``coef < 1`` (the row stores it as 1.0 / 0.0: what
        :func:`gradguard.clip.fraction_clipped` gives for one coefficient, in one op instead of
        two); a coefficient with more than one element goes to ``fraction_clipped``."""
        if not self.norm or coef is None:
            return None
        if coef.dim() != 0:
            return fraction_clipped(coef)
        return torch.lt(coef, self.consts.number(1.0, coef.device))  # a device 1.0: no scalar to wrap

    def in_place(self) -> Tensor | None:
        """Run a value / AGC / per-layer clipper on the gradients (norm clipping is the coefficient).

        Returns the fraction of units it clipped (a 0-D device tensor), ``None`` when it cannot say.
        """
        if self.clipper is None or self.norm:
            return None
        items: Sequence[Any] = self.named if self.clipper.takes_names else [p for _, p in self.named]
        if self._fraction:
            return self.clipper.clip_(list(items))
        self.clipper(list(items))
        return None
