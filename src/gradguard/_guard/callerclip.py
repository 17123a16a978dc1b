"""The caller's own norm clipping of a step (``clip_grad_norm_`` in a script), as columns of its row.

A guard that only measures (``clip=None``) still logs what the caller's clip did: its threshold,
its coefficient and whether it clipped. :class:`CallerClip` gathers the clip calls of one step
(a script may clip two parameter groups with two calls) and gives the row's columns:

* one call: ``threshold`` τ, ``clip_coef`` = min(1, τ / (‖g‖ + 1e-6)) (torch's own formula),
  ``clip_fraction`` 1.0 or 0.0; and ``grad_norm`` = torch's total norm when the call covered
  every gradient the guard measures with the guard's norm type (the same number, to the last bit);
* several calls over disjoint parts: ``threshold`` = the p-norm of the thresholds (the norm the
  whole gradient is held to when every call clips), ``clip_coef`` = ‖clipped g‖ / ‖g‖ (what the
  clipping did to the whole gradient), ``clip_fraction`` = the fraction of the calls that
  clipped; ``grad_norm`` stays the guard's own (measured before any of them).

Everything stays on the device (no host read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradguard.errors import GradGuardError

__all__ = ["CLIP_EPS", "CallerClip"]

CLIP_EPS = 1e-6  #: torch's clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)


@dataclass
class CallerClip:
    """The norm-clip calls the caller made on one step's gradients (see the module docstring)."""

    norm_type: float = 2.0
    thresholds: list[float] = field(default_factory=list)
    norms: list[Tensor] = field(default_factory=list)  # each call's pre-clip total norm (device)
    covers_all: bool = False  # a single call over every gradient the guard measures
    value_fraction: Tensor | None = None  # clip_grad_value_: the fraction of elements it clamps
    #: ``(grads, norms)``: the one call's per-tensor norms of these gradients (``stack`` of
    #: ``_foreach_norm``), where the caller has them: the guard's measurement may reuse them
    known: tuple[list[Tensor], Tensor] | None = None
    pending: float | None = None  # a clip whose norm is the guard's own (:meth:`add_at_guards_norm`)

    def add(self, threshold: float, norm: Tensor, *, covers_all: bool = False) -> None:
        """One clip call: its threshold and torch's total norm of its gradients (before it clipped)."""
        threshold = float(threshold)
        if not threshold >= 0:  # (0 as in torch: every gradient scaled to 0 — a script's "--clip 0")
            raise GradGuardError(
                f"a clip threshold must be a number ≥ 0, got {threshold!r}; pass the max_norm of the clip."
            )
        self.thresholds.append(threshold)
        if norm.requires_grad:  # (torch's clip computes it under no_grad: no call then)
            norm = norm.detach()
        if hasattr(
            norm, "full_tensor"
        ):  # FSDP2: torch's total norm of sharded gradients is a DTensor, partial
            norm = norm.full_tensor()  # on each rank: the all-reduce its clip makes too (every rank calls it)
        if norm.dtype != torch.float32:  # (each no-op call still costs ~1 µs on the host)
            norm = norm.float()
        self.norms.append(norm if norm.dim() == 0 else norm.reshape(()))
        self.covers_all = covers_all and len(self.norms) == 1

    def add_at_guards_norm(self, threshold: float) -> CallerClip:
        """One clip of every gradient the guard measures, made after the guard measured them
        (Lightning's ``gradient_clip_val`` under ``GradGuard(monitor_only=True)``): its pre-clip norm
        is the guard's own total norm, which joins at :meth:`measured` (no second read)."""
        self.pending = float(threshold)
        return self

    def measured(self, norm: Tensor) -> None:
        """The guard's total norm of the step, for a clip :meth:`add_at_guards_norm` left pending."""
        if self.pending is not None:
            threshold, self.pending = self.pending, None
            self.add(threshold, norm, covers_all=True)

    def add_value(self, clip_value: float, grads: list[Tensor]) -> None:
        """A ``clip_grad_value_`` call (before it clamps): the fraction of elements it will clamp
        is the step's ``clip_fraction``."""
        if grads:
            clamped = torch.stack([(g.detach().abs() > clip_value).sum() for g in grads]).sum()
            self.value_fraction = clamped.float() / max(1, sum(g.numel() for g in grads))

    def single(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """One norm-clip call (the usual case): its ``(clip_coef, threshold, clipped)`` as 0-D
        device tensors (``clipped``: the bool ``coef < 1``, stored as 1.0 / 0.0), in five small
        ops with no number to wrap; ``None`` for no call or several."""
        if len(self.norms) != 1:
            return None
        norm = self.norms[0]
        eps, one, threshold = _constants(norm.device, self.thresholds[0])
        # torch's τ / (‖g‖ + 1e-6), as torch's Tensor.__rtruediv__ computes it: (‖g‖ + 1e-6)⁻¹ · τ
        # (in place on the one new tensor: the same values, three allocations fewer)
        coef = torch.add(norm, eps).reciprocal_().mul_(threshold).clamp_max_(one)
        return coef, threshold, coef < one

    def grad_norm(self, norm_type: float) -> Tensor | None:
        """Torch's total norm of the one call, when it is the step's ``grad_norm`` (the call
        covered every gradient the guard measures, with the guard's ``norm_type``); else ``None``."""
        if len(self.norms) == 1 and self.covers_all and self.norm_type == norm_type:
            return self.norms[0]
        return None

    def known_norms(self, norm_type: float) -> tuple[list[Tensor], Tensor] | None:
        """The one call's ``(grads, per-tensor norms)`` (:attr:`known`) when they were taken with the
        guard's ``norm_type``: the guard's measurement may use them instead of reading the gradients
        again (it checks they are its own gradients); else ``None``."""
        if self.known is not None and len(self.norms) == 1 and self.norm_type == norm_type:
            return self.known
        return None

    def columns(self, norm_type: float) -> dict[str, Tensor | float]:
        """The row's columns for the calls so far (``norm_type``: the guard's, for ``grad_norm``)."""
        if not self.norms:
            return {} if self.value_fraction is None else {"clip_fraction": self.value_fraction}
        one_call = self.single()
        if one_call is not None:
            coef, threshold, clipped = one_call
            out: dict[str, Tensor | float] = {
                "threshold": threshold,
                "clip_coef": coef,
                "clip_fraction": clipped,
            }
            norm = self.grad_norm(norm_type)
            if norm is not None:
                out["grad_norm"] = norm
            return out
        norms = torch.stack(self.norms)
        thresholds = torch.tensor(self.thresholds)
        coefs = torch.clamp(thresholds.to(norms.device) / (norms + CLIP_EPS), max=1.0)
        return {
            "threshold": _pnorm(thresholds, self.norm_type).item(),  # host sync: none, a host tensor
            "clip_coef": _pnorm(coefs * norms, self.norm_type)
            / _pnorm(norms, self.norm_type).clamp_min(1e-30),
            "clip_fraction": (coefs < 1.0).float().mean(),
        }


_CONSTANTS: dict[tuple[torch.device, float], tuple[Tensor, Tensor, Tensor]] = {}
_MAX_CONSTANTS = 64  # (device, threshold) pairs kept (a script clips with one or two thresholds)


def _constants(device: torch.device, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """``CLIP_EPS``, 1 and ``threshold`` as 0-D float32 tensors on ``device``, made once: an op with
    a Python number wraps it into a tensor on every call (~1.5 µs on a CPU); in float32 the results
    are bit-identical to the numbers' (a number meets a float32 tensor as a float32)."""
    key = (device, threshold)
    found = _CONSTANTS.get(key)
    if found is None:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.clear()
        eps, one, tau = (
            torch.tensor(v, dtype=torch.float32, device=device) for v in (CLIP_EPS, 1.0, threshold)
        )
        found = _CONSTANTS[key] = (eps, one, tau)
    return found


def _pnorm(x: Tensor, p: float) -> Tensor:
    return x.abs().amax() if math.isinf(p) else x.abs().pow(p).sum().pow(1.0 / p)
