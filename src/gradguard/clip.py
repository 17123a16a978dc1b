"""Gradient clipping: norm, value, AGC, per-layer, AutoClip, ZClip and ``auto`` — sync-free.

Functions clip in place and return the pre-clip statistic as a device tensor, like
:func:`torch.nn.utils.clip_grad_norm_`. Stateful clippers (:class:`Clipper`) are callables
``clipper(parameters, norm=None) -> pre-clip norm`` with ``state_dict`` / ``load_state_dict``;
pass ``norm`` when it was already measured, so the gradients are read only once more (to scale).

Every clipper also says what it did and what it is:

* ``clipper.clip_(parameters, norm=None)`` clips like the call and returns the fraction of its
  units clipped this step (a 0-D float32 device tensor, no host read): the elements clamped
  (value), the units (AGC), the layers (per-layer), or 1.0 / 0.0 for global-norm clippers
  (:func:`fraction_clipped` of the coefficient). ``Norm(0)`` and ``AGC(0)`` read 1.0 (their
  specs ``"norm:0"``, ``"agc:0"`` are refused: they zero every gradient).
* ``clipper.kind`` and ``clipper.config()`` are the clipper as data (``{"kind": "zclip",
  "z_thresh": 2.5, ...}``, JSON-able); ``from_spec(config)`` rebuilds it.
* :data:`CLIPPERS` maps each kind to its class; :func:`from_spec` reads it, so a new clipper is a
  class (with ``kind``, ``from_arg``, ``clip_`` and ``config``) plus one line in that registry.

ZClip's rule is written once (:func:`_zclip_step`) and runs on device tensors (:class:`ZClip`,
:class:`Auto`) and on host floats (:class:`HostZClip`, the guard's spike warning).

The functions :func:`clip_grad_norm_`, :func:`get_total_norm`, :func:`clip_grads_with_norm_` and
:func:`clip_grad_value_` have torch.nn.utils's signatures and semantics (no_grad, ``foreach=``, the
empty-generator warning, ``error_if_nonfinite``'s message). What they do differently, on purpose
(the README's parity table lists every difference):

* A non-finite norm leaves the gradients untouched (coefficient 1): torch multiplies by
  ``τ/inf = 0`` or by NaN, zeroing every finite gradient or turning it into NaN. Detect the
  non-finite step from the returned norm (or let :class:`gradguard.Guard` skip it).
* Norms are overflow-safe: float16/bfloat16 norms are float32 (a float16 norm above 65504 is
  measured, not ``inf``); the functions accumulate float32 gradients in float64 in their one read
  (elements of 1.8e19 and more are measured and clipped), and the total accumulates in float64
  (see :mod:`gradguard.stats`). The clippers called on their own measure in float32, as the
  :class:`gradguard.Guard` does (it re-measures a step whose float32 norm overflowed).
* Bad input is refused with a :class:`gradguard.GradGuardError` (what, the value, the fix): a
  negative or NaN threshold, ``norm_type`` ≤ 0 or NaN, complex or sparse gradients, gradients on
  several devices.
* A tensor ``max_norm`` is never read on the host (except by ``config()``, once, for the run's metadata).
* Adaptive clippers update their state with finite norms only: one NaN step never poisons them.
"""

from __future__ import annotations

import bisect
import inspect
import math
import struct
import sys
import types
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from gradguard import _rule_kernel
from gradguard._rule_kernel import FIRST_CAP, NO_CAP, POLYAK_CAP
from gradguard.errors import GradGuardError, NonFiniteError, did_you_mean
from gradguard.stats import (
    _FOREACH_DEVICES,
    LayerIndex,
    as_tensor_list,
    check_norm_type,
    check_tensors,
    exact_norms,
    grads_of,
    tensor_norms,
    total_norm,
)

__all__ = [
    "AGC",
    "CLIPPERS",
    "Auto",
    "AutoClip",
    "Clipper",
    "HostZClip",
    "Norm",
    "NormClipper",
    "PerLayer",
    "SpecArgError",
    "Value",
    "ZClip",
    "clip_grad_agc_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "coefficient",
    "fraction_clipped",
    "from_spec",
    "get_total_norm",
    "scale_",
    "spec_no_arg",
    "spec_number",
]

_STATE_VERSION = 1


# ----------------------------------------------------------------------------- shared pieces
_NORM_HINT = "Pick one from the observed gradient norms (`gradguard diagnose` recommends one), e.g. 1.0."
_AGC_HINT = (
    "It is AGC's largest ratio of a unit's gradient norm to its weight norm, not a gradient norm: "
    "the default is 0.01 (NFNets used 0.01–0.16)."
)
_AGC_EPS_HINT = "It is the floor of the weight norms AGC divides by: the default is 1e-3."


def _check_threshold(
    value: float | Tensor, name: str, *, allow_inf: bool = True, hint: str = _NORM_HINT
) -> float | Tensor:
    """A float threshold must be a number ≥ 0 (``hint``: what to pick instead, in the error); a
    tensor one is left on device (not validated: that would sync)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise GradGuardError(
                f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}."
            )
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise GradGuardError(f"{name} must be a number, got {value!r}.") from None
    if math.isnan(v) or v < 0 or (math.isinf(v) and not allow_inf):
        raise GradGuardError(
            f"{name} must be {'a number' if allow_inf else 'a finite number'} ≥ 0, got {value!r}. {hint}"
        )
    return v


def coefficient(
    norm: Tensor,
    threshold: float | Tensor,
    *,
    finite_eps: Tensor | None = None,
    nonnegative: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """The norm-clipping coefficient ``min(1, τ / (‖g‖ + 1e-6))`` as a float32 device tensor.

    1 (leave the gradients alone) where the norm or the threshold is non-finite, and clamped at 0
    for a negative tensor threshold, so the coefficient itself never zeroes finite gradients by
    accident nor writes NaN. No host sync.

    How, in 5 small ops with no Python number (each costs ~1.5 µs of dispatch on a CPU, a kernel
    launch on a GPU): the 1e-6 becomes NaN where the norm is not finite (``‖g‖·0`` is 0 exactly
    where ‖g‖ is finite), so τ / (‖g‖ + 1e-6) is NaN there, as it is for a NaN τ; ``fmin`` with 1
    takes 1 for a NaN, ``fmax`` with 0 clamps a negative τ's.

    ``finite_eps``: that 1e-6-or-NaN already made by the caller, a 0-D tensor of the norm's dtype
    (the guard's finiteness test of the step makes it in the same op): 1 op fewer.
    ``nonnegative``: the caller's promise that τ / (‖g‖ + 1e-6) is never negative (a norm ≥ 0 and a
    checked number threshold ≥ 0, inf, or its 0-D constant): no clamp at 0, 1 op fewer.
    ``out``: a 0-D tensor of the result's dtype to write the coefficient into (the guard's row).
    Bit for bit the ``clamp`` and ``where`` of the formula (checked on norms and thresholds of every
    kind: 0, tiny, huge, inf, NaN, negative, ±0).
    """
    # (no call for a float32 or float64 norm: a no-op ``to`` still costs ~1 µs on the host)
    n = norm if norm.dtype is torch.float32 or norm.dtype is torch.float64 else norm.to(torch.float32)
    tau: float | Tensor = threshold
    if isinstance(threshold, Tensor) and (
        threshold.dim() != 0 or threshold.dtype != n.dtype or threshold.device != n.device
    ):
        tau = threshold.to(device=n.device, dtype=n.dtype)
        if tau.numel() == 1:  # a (1,)-shaped max_norm scales like a scalar (foreach needs 0-D)
            tau = tau.reshape(())
    eps, zero, one = _coefficient_constants(n)
    # ‖g‖ + 1e-6, NaN where ‖g‖ is not finite ((‖g‖ + 1e-6) + ‖g‖·0: the same bits where it is)
    den = n + finite_eps if finite_eps is not None else torch.addcmul(n + eps, n, zero)
    coef = tau / den
    if nonnegative:
        return torch.fmin(coef, one, out=out) if out is not None else torch.fmin(coef, one)
    coef = torch.fmin(coef, one)
    return torch.fmax(coef, zero, out=out) if out is not None else torch.fmax(coef, zero)


def host_coefficient(norm: float, threshold: float, *, nonnegative: bool = False) -> float:
    """:func:`coefficient` for a float32 norm and threshold read on the host (a CPU step: no op), bit
    for bit its float32 result: each float32 operation is the float64 one rounded to float32, which
    is exact for one ``+`` or ``/`` (53 bits ≥ 2·24 + 2). ``threshold`` is rounded to float32 first,
    as :func:`coefficient` converts a threshold tensor to the norm's dtype."""
    if not math.isfinite(norm):
        return 1.0  # (the 1e-6 is NaN there: τ / NaN is NaN, and ``fmin`` takes 1)
    coef = _float32(_float32(threshold) / _float32(norm + _EPS32))
    if coef != coef or coef >= 1.0:  # ``fmin`` with 1 (a NaN τ: 1)
        return 1.0
    return coef if nonnegative or coef >= 0.0 else 0.0  # ``fmax`` with 0 (-0.0 stays, as fmax's)


#: The ``1e-6`` of :func:`coefficient` (torch's ``clip_grad_norm_``'s).
COEF_EPS = 1e-6
_EPS32 = struct.unpack("f", struct.pack("f", COEF_EPS))[0]  # as a float32 tensor holds it


_CONSTANTS: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}


def _coefficient_constants(n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """1e-6, 0 and 1 as 0-D tensors of ``n``'s dtype on its device, made once per (device, dtype).

    An op with a Python number wraps it into a tensor on every call (~2.8 µs on CPU against ~1.2 µs
    with a tensor); in ``n``'s dtype the results are bit-identical to the Python numbers'."""
    key = (n.device, n.dtype)
    consts = _CONSTANTS.get(key)
    if consts is None:
        eps, zero, one = (torch.tensor(v, dtype=n.dtype, device=n.device) for v in (COEF_EPS, 0.0, 1.0))
        consts = _CONSTANTS[key] = (eps, zero, one)
    return consts


def fraction_clipped(coef: Tensor) -> Tensor:
    """The fraction of the coefficients below 1 (units scaled down), as a 0-D float32 device tensor.

    For a global-norm clipper's one coefficient this is the step's clip fraction: 1.0 when it
    clipped, 0.0 when not (a non-finite norm has coefficient 1: not clipped; ``Norm(0)`` has
    coefficient 0: 1.0). Per-layer clipping applies it to its per-layer coefficients. No host sync.
    """
    below = coef < _coefficient_constants(coef)[2]
    return below.to(torch.float32) if below.dim() == 0 else below.mean(dtype=torch.float32)


def scale_(tensors: Sequence[Tensor], coef: Tensor, *, foreach: bool | None = None) -> None:
    """Multiply every tensor in place by a 0-D device tensor (one write pass, grouped by device/dtype)."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for (device, _), ts in groups.items():
        c = coef.to(device)
        if (foreach is not False and device.type != "meta") or foreach:
            torch._foreach_mul_(ts, c)
        else:
            for t in ts:
                t.mul_(c)


# ----------------------------------------------------------------------------- functions
# torch.nn.utils's clipping functions, same signatures: clip_grad_norm_ is get_total_norm followed by
# clip_grads_with_norm_. Every one runs under no_grad (after backward(create_graph=True) the returned
# norm does not require grad and the clip is not recorded in the graph). The differences from torch
# are deliberate and listed in the README ("Drop-in parity with torch.nn.utils").
def get_total_norm(
    tensors: Tensor | Iterable[Tensor],
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """The global p-norm of ``tensors`` (the norm of their norms), like :func:`torch.nn.utils.get_total_norm`.

    Overflow-safe in one read of each tensor: float32 elements of 1.8e19 and more, whose squares
    overflow float32, give their finite norm. Off the CPU every dtype accumulates in float64 in
    that read (``wide`` in :func:`gradguard.stats.tensor_norms`); on the CPU, where a float64 norm
    costs 15-50x a float32 one, only a tensor whose float32 norm overflowed is measured again,
    exactly. The total of the per-tensor norms accumulates in float64. No host sync (except ``error_if_nonfinite=True``, one read, as in torch).

    Args:
        tensors: tensors (e.g. gradients; not parameters), or one tensor, on one device.
        norm_type: p > 0 or ``inf``.
        error_if_nonfinite: raise :class:`gradguard.NonFiniteError` (a ``RuntimeError``) when the
            norm is NaN or infinite.
        foreach: use the foreach kernels (default: where supported).

    Returns:
        The norm as a 0-D tensor: float32 (float64 when any tensor is float64; float32 for
        float16/bfloat16 tensors, where torch returns their dtype); 0 for no tensors.
    """
    p = check_norm_type(norm_type)
    ts = as_tensor_list(tensors)
    check_tensors(ts)
    return _total(ts, p, error_if_nonfinite, foreach)


def clip_grads_with_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float | Tensor,
    total_norm: Tensor | float,
    foreach: bool | None = None,
) -> None:
    """Scale the gradients by ``min(1, max_norm / (total_norm + 1e-6))`` in place, like
    :func:`torch.nn.utils.clip_grads_with_norm_`, except that a non-finite ``total_norm`` leaves them
    untouched (torch zeroes them or fills them with NaN). No host sync.

    Args:
        parameters: tensors (or one tensor) whose ``.grad`` is scaled.
        max_norm: the threshold τ ≥ 0 (float or 1-element tensor, never read on the host).
        total_norm: the norm to clip with, e.g. from :func:`get_total_norm`.
        foreach: use the foreach kernels (default: where supported).
    """
    threshold = _check_threshold(max_norm, "max_norm")
    _scale_to(grads_of(parameters), threshold, total_norm, foreach)


def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float | Tensor,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Clip the global gradient norm in place: ``g ← τ·g/‖g‖`` when ``‖g‖ ≥ τ`` (Pascanu et al. 2013).

    A drop-in for :func:`torch.nn.utils.clip_grad_norm_` (same result to float tolerance wherever
    torch's is finite): :func:`get_total_norm` of the gradients, then :func:`clip_grads_with_norm_`.
    Overflow-safe (float16 norms above 65504 and float32 gradients whose squares overflow are
    measured and clipped), and it never zeroes or NaN-fills finite gradients when the norm is
    non-finite: it leaves them untouched and returns the non-finite norm. ``max_norm`` may be a
    device tensor; it is never read on the host. No host sync.

    Args:
        parameters: tensors (or one tensor) whose ``.grad`` is clipped. An empty generator (e.g.
            ``model.parameters()`` consumed by an earlier call) warns, as torch does.
        max_norm: the threshold τ ≥ 0 (float or 1-element tensor).
        norm_type: p > 0 or ``inf``.
        error_if_nonfinite: raise :class:`gradguard.NonFiniteError` (a ``RuntimeError``, torch's
            message) on a non-finite norm, before touching the gradients. This reads the norm on
            the host (one sync), as torch does.
        foreach: use the foreach kernels (default: where supported).

    Returns:
        The pre-clip global norm (float32; float64 for float64 gradients).

    Example:
        >>> import torch, gradguard
        >>> w = torch.nn.Parameter(torch.ones(4)); w.grad = torch.full((4,), 10.0)
        >>> float(gradguard.clip_grad_norm_([w], max_norm=1.0))
        20.0
        >>> round(float(w.grad.norm()), 4)
        1.0
    """
    threshold = _check_threshold(max_norm, "max_norm")
    p = check_norm_type(norm_type)
    grads = grads_of(_parameter_list(parameters))
    total = _total(grads, p, error_if_nonfinite, foreach)
    _scale_to(grads, threshold, total, foreach)
    return total


def _parameter_list(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    """The parameters as a list; warns (as torch does) when they came from a generator that gave nothing."""
    is_generator = isinstance(parameters, types.GeneratorType)
    params = as_tensor_list(parameters)
    if is_generator and not params:
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur. A generator such as "
            "`model.parameters()` is used up by its first pass: pass `list(model.parameters())` to "
            "reuse it.",
            stacklevel=3,  # the caller of clip_grad_norm_
        )
    return params


def _total(tensors: list[Tensor], p: float, error_if_nonfinite: bool, foreach: bool | None) -> Tensor:
    """The overflow-safe global p-norm of checked tensors, under no_grad; raises on a non-finite one
    when asked (the only host read here)."""
    with torch.no_grad():
        norms = tensor_norms(tensors, p, foreach=foreach, wide=_wide_is_cheap(tensors))
        total = total_norm(_exact_where_overflowed_on_cpu(tensors, norms, p), p)
    if error_if_nonfinite and not bool(torch.isfinite(total)):  # host sync: opt-in, as in torch
        raise NonFiniteError(_nonfinite_message(p, total))
    return total


def _wide_is_cheap(tensors: list[Tensor]) -> bool:
    """Accumulate the per-tensor norms in float64 where that costs nothing measurable: off the CPU
    (the foreach kernel reads float32 and accumulates wider). On the CPU a float64 norm converts each
    tensor first: measured 15-50x a float32 norm (2-core x86_64, torch 2.13, a 3.9M-parameter GPT's
    gradients), so the CPU keeps torch's float32 accumulation (see the README's parity table)."""
    return bool(tensors) and tensors[0].device.type != "cpu"


def _exact_where_overflowed_on_cpu(tensors: list[Tensor], norms: Tensor, p: float) -> Tensor:
    """On the CPU, re-measure exactly (:func:`gradguard.stats.exact_norms`) the tensors whose float32
    norm overflowed, so that finite gradients of 1.8e19 and more are measured and clipped.

    Reading a CPU tensor waits for nothing (there is no device queue), so the check is one small op
    and a list; the extra reads happen only for the tensors that overflowed. Off the CPU the norms
    already accumulated in float64 (:func:`_wide_is_cheap`) and nothing is read here."""
    if math.isinf(p) or not tensors or tensors[0].device.type != "cpu":
        return norms
    overflowed = torch.isinf(norms).tolist()  # CPU memory: no device sync
    # float64 overflows where torch's does too (|x| ≥ ~1.3e154): kept, as off the CPU
    over = [i for i, bad in enumerate(overflowed) if bad and tensors[i].dtype != torch.float64]
    if not over:
        return norms
    fixed = norms.to(torch.float64)  # a copy: the caller's norms stay as measured
    fixed[over] = exact_norms([tensors[i] for i in over], p)
    return fixed


def _nonfinite_message(p: float, total: Tensor) -> str:
    """torch's message for ``error_if_nonfinite=True``, word for word, then gradguard's own note."""
    return (
        f"The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be "
        "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
        f"`error_if_nonfinite=False`. gradguard: the norm is {float(total)}; with error_if_nonfinite=False "
        "gradguard leaves the gradients untouched (it never scales them by a non-finite norm). Find the "
        "first non-finite value with `gradguard.locate`."
    )


def _scale_to(
    grads: list[Tensor], threshold: float | Tensor, total: Tensor | float, foreach: bool | None
) -> None:
    """Scale ``grads`` in place by :func:`coefficient` of ``total`` and ``threshold``, under no_grad."""
    if not grads:
        return
    if not isinstance(total, Tensor):
        total = torch.tensor(float(total))  # a host number; moved with the coefficient
    with torch.no_grad():
        scale_(grads, coefficient(total, threshold), foreach=foreach)


def clip_grad_value_(
    parameters: Tensor | Iterable[Tensor], clip_value: float, foreach: bool | None = None
) -> Tensor:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` in place, like
    :func:`torch.nn.utils.clip_grad_value_` (under no_grad; no host sync).

    Returns the pre-clip max-abs of the gradients (torch returns None), so an overflow is still
    visible: value clipping maps ±inf to ±clip_value and lets NaN through, hiding what went wrong.
    """
    v = float(_check_threshold(clip_value, "clip_value"))
    grads = grads_of(parameters)
    with torch.no_grad():
        maxabs = total_norm(tensor_norms(grads, math.inf, foreach=foreach), math.inf)
        _clamp_(grads, v, foreach=foreach)
    return maxabs


def _clamp_(grads: Sequence[Tensor], v: float, *, foreach: bool | None = None) -> None:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), ts in groups.items():
        if (foreach is not False and device.type != "meta") or foreach:
            torch._foreach_clamp_min_(ts, -v)
            torch._foreach_clamp_max_(ts, v)
        else:
            for t in ts:
                t.clamp_(-v, v)


def _clamped_fraction(grads: Sequence[Tensor], v: float) -> Tensor:
    """The fraction of the elements of ``grads`` that clamping to ``[-v, v]`` changes (``|g| > v``;
    NaN passes through unclamped), as a 0-D float32 tensor on their device. One extra read of each
    gradient (a count cannot come out of the clamp itself); no host sync."""
    numel = sum(g.numel() for g in grads)
    if numel == 0:
        return torch.zeros((), device=grads[0].device if grads else None)
    counts = torch.stack([(g.abs() > v).sum() for g in grads])
    return counts.sum().div(numel).to(torch.float32)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_norms(mats: list[Tensor], vecs: list[Tensor], acc: torch.dtype, foreach: bool) -> Tensor:
    """The 2-norms of the output units of tensors of one dtype, as one 1-D ``acc`` tensor: the rows
    (dim 0) of each rank ≥ 2 tensor of ``mats`` in order, then one norm per tensor of ``vecs``."""
    parts = [torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), dtype=acc) for t in mats]
    if vecs:
        if foreach:
            norms = torch._foreach_norm(vecs, 2.0, dtype=None if vecs[0].dtype == acc else acc)
        else:
            norms = tuple(torch.linalg.vector_norm(t, dtype=acc) for t in vecs)
        parts.append(torch.stack(norms))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def clip_grad_agc_(
    parameters: Tensor | Iterable[Tensor],
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    *,
    exclude: Iterable[Tensor] = (),
) -> Tensor:
    """Adaptive Gradient Clipping (Brock, De, Smith, Simonyan, ICML 2021 — NFNets), in place.

    Per output unit i (row i of a Linear/Embedding weight, output channel of a ConvNd weight;
    the whole tensor for biases and other rank ≤ 1 tensors)::

        ‖W_i‖* = max(‖W_i‖, eps);  if ‖G_i‖ > λ‖W_i‖*:  G_i ← λ‖W_i‖* / max(‖G_i‖, 1e-6) · G_i

    The paper uses λ = 0.01 at batch 4096 (larger batches want smaller λ), ε = 1e-3, and does not
    clip the final classifier: pass its parameters in ``exclude``. A unit whose gradient is
    non-finite is left untouched. ``ConvTranspose`` weights put the output channel in dim 1:
    exclude them or expect per-input-channel units.

    The coefficients of all units are computed at once per (gradient dtype, weight dtype) group
    (norms accumulated in float32 for float16/bfloat16, float64 for float64), then applied with
    one foreach multiply: no per-tensor coefficient math, no host sync.

    Returns:
        The pre-clip global 2-norm of all gradients (excluded ones included), float32.
    """
    unit_norms, _ = _agc_(parameters, clip_factor, eps, exclude)
    if not unit_norms:
        return torch.zeros(())
    # the global norm is the norm of the unit norms (each tensor's norm is the norm of its units')
    allnorms = unit_norms[0] if len(unit_norms) == 1 else torch.cat(unit_norms)
    return torch.linalg.vector_norm(allnorms, dtype=torch.float64).to(torch.float32)


def _agc_(
    parameters: Tensor | Iterable[Tensor], clip_factor: float, eps: float, exclude: Iterable[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """AGC in place (see :func:`clip_grad_agc_`). Returns the pre-clip gradient norms of the units
    (then of the excluded tensors), the pieces of the global norm, and per group which units were
    clipped, the pieces of the clip fraction: the caller finishes the one it reports."""
    lam = float(_check_threshold(clip_factor, "clip_factor", allow_inf=False, hint=_AGC_HINT))
    e = float(_check_threshold(eps, "eps", allow_inf=False, hint=_AGC_EPS_HINT))
    groups, others = _agc_groups(parameters, exclude)
    check_tensors([g for lists in groups.values() for g in lists[0] + lists[2]] + others, what="gradient")
    unit_norms: list[Tensor] = []
    clipped: list[Tensor] = []
    with torch.no_grad():
        for (g_dtype, w_dtype), (g_mats, w_mats, g_vecs, w_vecs) in groups.items():
            foreach = (g_mats + g_vecs)[0].device.type in _FOREACH_DEVICES
            gn = _unit_norms(g_mats, g_vecs, _acc(g_dtype), foreach)
            max_n = _unit_norms(w_mats, w_vecs, _acc(w_dtype), foreach).clamp_min(e).mul_(lam)
            # a unit with a non-finite gradient norm is left untouched (λ‖W‖*/inf = 0 would zero it)
            gf = gn.nan_to_num(nan=0.0, posinf=0.0)
            over = gf > max_n
            coef = torch.where(over, max_n / gf.clamp_min(1e-6), 1.0)
            if coef.dtype != g_dtype:
                coef = coef.to(g_dtype)
            pieces = coef.split([g.shape[0] for g in g_mats] + [len(g_vecs)])
            # back to the units' shapes: (rows, 1, …) for the rank ≥ 2 tensors, 0-D for the others
            coefs = [c.view((c.shape[0],) + (1,) * (g.ndim - 1)) for c, g in zip(pieces, g_mats)]
            coefs.extend(pieces[-1].unbind())
            if foreach:
                torch._foreach_mul_(g_mats + g_vecs, coefs)
            else:
                for g, c in zip(g_mats + g_vecs, coefs):
                    g.mul_(c)
            unit_norms.append(gn)
            clipped.append(over)
        if others:
            unit_norms.append(tensor_norms(others))
    return unit_norms, clipped


def _agc_groups(
    parameters: Tensor | Iterable[Tensor], exclude: Iterable[Tensor]
) -> tuple[dict[tuple[torch.dtype, torch.dtype], tuple[list[Tensor], ...]], list[Tensor]]:
    """Per (gradient dtype, weight dtype): the gradients and weights of the rank ≥ 2 tensors, then of
    the others; and the gradients of the excluded tensors. Tensors without a gradient are left out."""
    skip = {id(t) for t in exclude}
    groups: dict[tuple[torch.dtype, torch.dtype], tuple[list[Tensor], ...]] = {}
    others: list[Tensor] = []
    for p in as_tensor_list(parameters):
        g = p.grad
        if g is None:
            continue
        if id(p) in skip:
            others.append(g)
            continue
        g_mats, w_mats, g_vecs, w_vecs = groups.setdefault((g.dtype, p.dtype), ([], [], [], []))
        if g.ndim >= 2:
            g_mats.append(g)
            w_mats.append(p.detach())
        else:
            g_vecs.append(g)
            w_vecs.append(p.detach())
    return groups, others


def _mean_of(masks: list[Tensor], device: torch.device | None) -> Tensor:
    """The fraction of True in the bool tensors ``masks`` (0 when there are none), 0-D float32."""
    if sum(m.numel() for m in masks) == 0:  # no units (shapes are known on the host)
        return torch.zeros((), device=device)
    mask = masks[0] if len(masks) == 1 else torch.cat(masks)
    return mask.mean(dtype=torch.float32)


# ----------------------------------------------------------------------------- specs
class SpecArgError(GradGuardError):
    """The argument of a spec ``"kind:arg"`` does not fit its kind (raised by ``from_arg``).

    :func:`from_spec` turns it into an error that names the whole spec and the accepted forms.
    ``reason`` is None when the kind takes no argument or needs one that is missing (then the spec
    is not one of the accepted forms).
    """

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "the spec's argument does not fit its kind")
        self.reason = reason


def spec_number(arg: str | None, default: float | None = None) -> float:
    """The number after the colon of a spec; ``default`` when there is none (None: it is required)."""
    if arg is None:
        if default is None:
            raise SpecArgError("it needs a number after a colon")
        return default
    try:
        return float(arg)
    except ValueError:
        raise SpecArgError(f"{arg!r} is not a number") from None


def spec_no_arg(arg: str | None) -> None:
    """Refuse an argument for a kind that takes none (``"auto"``)."""
    if arg is not None:
        raise SpecArgError()


def _tensors(parameters: Any) -> list[Any]:
    """Tensors, or ``(name, tensor)`` pairs, as a list (a generator is read once)."""
    return [parameters] if isinstance(parameters, Tensor) else list(parameters)


def _is_zero(threshold: float | Tensor) -> bool:
    """A float threshold of 0 (a tensor one is never read on the host)."""
    return not isinstance(threshold, Tensor) and threshold == 0


def _json_number(x: float | Tensor) -> float | None:
    """A threshold as a JSON number: a tensor's value now (one host read; None on ``meta``)."""
    if isinstance(x, Tensor):
        return None if x.device.type == "meta" else float(x.reshape(()))
    return x


# ----------------------------------------------------------------------------- stateful clippers
class Clipper:
    """Base class of the stateful clippers. Every clipper

    * clips in place when called, ``clipper(parameters, norm=None) -> Tensor``, and returns the
      pre-clip statistic (the global norm; :class:`Value`: the max-abs), as the clipping functions do;
      pass ``norm`` when it was already measured;
    * says what it did: :meth:`clip_` clips the same way and returns the fraction of its units
      clipped this step (0-D float32, on the gradients' device, no host read);
    * is data: :attr:`kind` names it in specs and in :meth:`config`, whose dict
      :meth:`from_config` (or :func:`from_spec`) rebuilds it; :meth:`from_arg` builds it from the
      argument of a spec ``"kind:arg"``;
    * saves its state: ``state_dict`` / ``load_state_dict`` (tensors and Python scalars only).

    A new clipper implements :meth:`clip_` (the call then measures the global norm and clips with
    it), sets :attr:`kind` and :attr:`usage`, and adds the constructor's parameters to :meth:`config`;
    one line ``CLIPPERS[MyClipper.kind] = MyClipper`` makes ``from_spec("mykind:3")`` and
    ``Guard(..., clip="mykind:3")`` build it. Subclasses that only need a threshold from the global
    norm derive from :class:`NormClipper`.
    """

    kind: ClassVar[str]
    """The clipper's name in specs (``"norm"`` in ``"norm:5"``) and in :meth:`config`."""
    usage: ClassVar[str] = ""
    """How to write its spec, listed by :func:`from_spec`'s errors: ``"norm:MAX_NORM (…)"``."""
    takes_names: ClassVar[bool] = False
    """True: call it with ``(name, parameter)`` pairs (``model.named_parameters()``) when there are names."""
    takes_loss: ClassVar[bool] = False
    """True: :class:`gradguard.Guard` hands it each step's loss (``observe_loss``) before it clips."""
    norm_type: float = 2.0

    @classmethod
    def from_arg(cls, arg: str | None) -> Clipper:
        """The clipper of the spec ``"kind:arg"`` (``arg`` None for ``"kind"``); raise
        :class:`SpecArgError` for an argument it does not take (see :func:`spec_number`)."""
        raise NotImplementedError(f"{cls.__name__} has no spec: define from_arg(arg) to build it from one.")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Clipper:
        """The clipper that :meth:`config` describes: the constructor called with its parameters (a key
        it does not take, or one it needs and is not there, refused with its keys named)."""
        params = {k: v for k, v in config.items() if k != "kind"}
        _check_config_keys(cls, config, params)
        return cls(**params)

    def config(self) -> dict[str, Any]:
        """The clipper as data: ``{"kind": ..., **constructor parameters}``, JSON-able (for ``meta.json``)."""
        return {"kind": getattr(self, "kind", type(self).__name__)}

    def zeroes_every_gradient(self) -> bool:
        """True when a threshold of 0 makes this clipper scale or clamp every gradient to 0 (the
        weights would never move): :func:`from_spec` refuses such a spec. False by default."""
        return False

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Bind to the optimizer that steps the clipped parameters (:class:`gradguard.Guard` calls it at
        construction). Nothing by default; :class:`Auto` reads the learning rate from it each step."""

    def observe_loss(self, loss: Tensor | float | None) -> None:
        """The loss of the step about to be clipped, for clippers with ``takes_loss``. Nothing by default."""

    def __call__(self, parameters: Any, norm: Tensor | None = None) -> Tensor:
        """Clip in place; return the pre-clip global norm (``norm`` when given, else measured here)."""
        items = _tensors(parameters)
        if norm is None:
            plain = [p[1] if isinstance(p, tuple) else p for p in items]
            norm = total_norm(tensor_norms(grads_of(plain), self.norm_type), self.norm_type)
        self.clip_(items, norm)
        return norm

    def clip_(self, parameters: Any, norm: Tensor | None = None) -> Tensor:
        """Clip in place, like the call; return the fraction of this clipper's units clipped this step.

        A 0-D float32 tensor on the gradients' device, computed without a host read. A clipper
        written before this method existed (it defines only the call) reports NaN: unknown.
        """
        if type(self).__call__ is Clipper.__call__:
            raise NotImplementedError(f"{type(self).__name__} must define clip_(parameters, norm=None).")
        self(parameters, norm)
        return torch.full((), math.nan, device=None if norm is None else norm.device)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and Python scalars only (``torch.load(weights_only=True)`` loads it); ``kind``: the
        clipper's class, checked on loading."""
        return {"version": _STATE_VERSION, "kind": type(self).__name__}

    def check_state(self, state: Any) -> None:
        """Refuse, before anything is loaded, a state that is not this clipper's: another version, or
        another kind of clipper (an AutoClip's percentile state in a ZClip: a KeyError half-way)."""
        if not isinstance(state, dict):
            raise GradGuardError(
                f"{type(self).__name__} state must be the dict state_dict() returned, not {type(state).__name__}."
            )
        version = state.get("version")
        if version != _STATE_VERSION:
            raise GradGuardError(
                f"{type(self).__name__} state has version {version!r}; this gradguard reads version "
                f"{_STATE_VERSION}. Save it again with this version or start the clipper fresh."
            )
        kind = state.get("kind")
        if kind is not None and kind != type(self).__name__:
            raise GradGuardError(
                f"the clipper state was saved by the {kind} clipper; this guard clips with {type(self).__name__}. "
                f"Build the guard with the clip= it was saved with, or start this clipper fresh (load the rest "
                "of the state with state['clipper'] = None)."
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NormClipper(Clipper):
    """Global-norm clipping with a threshold chosen per step by :meth:`threshold`.

    The :class:`gradguard.Guard` calls :meth:`threshold` with the norm it measured and folds the
    coefficient into the optimizer step (its clip fraction: :func:`fraction_clipped` of that
    coefficient); calling the clipper does the same on its own.
    """

    def threshold(self, norm: Tensor) -> Tensor:
        """Observe this step's global norm (finite values only) and return τ for this step."""
        raise NotImplementedError

    def __call__(self, parameters: Tensor | Iterable[Tensor], norm: Tensor | None = None) -> Tensor:
        return self._scale(parameters, norm)[0]

    def clip_(self, parameters: Tensor | Iterable[Tensor], norm: Tensor | None = None) -> Tensor:
        """Clip; return 1.0 if the coefficient was below 1 (the gradients were scaled down), else 0.0."""
        return fraction_clipped(self._scale(parameters, norm)[1])

    def _scale(self, parameters: Tensor | Iterable[Tensor], norm: Tensor | None) -> tuple[Tensor, Tensor]:
        """Scale the gradients by this step's coefficient; return (the pre-clip norm, the coefficient:
        1 without gradients, as nothing was scaled)."""
        grads = grads_of(parameters)
        if norm is None:
            norm = total_norm(tensor_norms(grads, self.norm_type), self.norm_type)
        coef = coefficient(norm, self.threshold(norm))  # the threshold observes the norm either way
        if not grads:
            return norm, torch.ones_like(coef)
        scale_(grads, coef)
        return norm, coef


class Norm(NormClipper):
    """Fixed-threshold global-norm clipping (``"norm:5"``); ``max_norm`` may be a device tensor."""

    kind = "norm"
    usage = "norm:MAX_NORM (global norm clipping, e.g. norm:5)"

    def __init__(self, max_norm: float | Tensor, norm_type: float = 2.0) -> None:
        self.max_norm = _check_threshold(max_norm, "max_norm")
        self.norm_type = check_norm_type(norm_type)

    @classmethod
    def from_arg(cls, arg: str | None) -> Norm:
        return cls(spec_number(arg))

    def config(self) -> dict[str, Any]:
        """A tensor ``max_norm`` is read once here (its value now; None on ``meta``)."""
        return {**super().config(), "max_norm": _json_number(self.max_norm), "norm_type": self.norm_type}

    def zeroes_every_gradient(self) -> bool:
        return _is_zero(self.max_norm)

    def threshold(self, norm: Tensor) -> Tensor:
        if isinstance(self.max_norm, Tensor):
            return self.max_norm.to(device=norm.device, dtype=torch.float32).reshape(())
        return torch.full((), self.max_norm, dtype=torch.float32, device=norm.device)

    def __repr__(self) -> str:
        return f"Norm(max_norm={self.max_norm})"


#: Tests set this to run the device path (no host read) on the CPU too, where a CPU value would be
#: read on the host (:func:`_reads_on_host`, and the guard's host branch on the CPU,
#: :func:`gradguard._guard.apply.branches_on_host`): the path a GPU takes stays checked (its
#: sync-freedom, its device ops) where the tests run.
_PIN_DEVICE_PATH = False


def _check_config_keys(cls: type[Clipper], config: dict[str, Any], params: dict[str, Any]) -> None:
    """Refuse a config dict whose keys ``cls``'s constructor does not take (``{"kind": "zclip",
    "version": 1}``: a bare TypeError, or worse a key dropped) or that lacks one it needs."""
    keys = _constructor_keys(cls)
    if keys is None:
        return
    names, required = keys
    unknown = [k for k in params if k not in names]
    missing = [k for k in required if k not in params]
    if not unknown and not missing:
        return
    kind = getattr(cls, "kind", cls.__name__)
    what = (
        f"unknown key {unknown[0]!r}{did_you_mean(unknown[0], names)}"
        if unknown
        else f"no {', '.join(map(repr, missing))}, which the {kind} clipper needs"
    )
    raise GradGuardError(
        f"clip config {config!r}: {what}. The {kind} clipper's keys are 'kind', {', '.join(map(repr, names))}. "
        f"Pass the dict a clipper's config() returns, or a spec string: {cls.usage or kind}."
    )


def _constructor_keys(cls: type) -> tuple[list[str], list[str]] | None:
    """The keyword arguments a clipper's constructor takes and those it needs, a ``**kwargs`` followed
    to the next constructor up (:class:`Auto`'s ``**zclip``: :class:`ZClip`'s); ``None`` when it ends
    open (a ``**kwargs`` that no constructor up names: what it takes cannot be known)."""
    names: list[str] = []
    required: list[str] = []
    open_end = False
    for klass in cls.__mro__[:-1]:  # (object's constructor takes nothing)
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        names += [p.name for p in named]
        required += [p.name for p in named if p.default is p.empty]
        open_end = any(p.kind is p.VAR_KEYWORD for p in params)
        if not open_end:
            break
    return None if open_end else (names, required)


def _reads_on_host(t: Tensor) -> bool:
    """Whether a rule may read ``t`` and go on in host floats: a CPU value (the read waits for no
    device; on the CPU a small tensor op costs ~2–5 µs of dispatch, a float operation ~0.05), outside a
    compiled region (where a read would break the graph), unless tests pin the device path."""
    # (Tensor.is_cpu: 0.05 µs; .device: 0.3)
    return t.is_cpu and not _PIN_DEVICE_PATH and not torch.compiler.is_compiling()


class _TwoForms:
    """A clipper's state, held in one of two forms at a time: device tensors, which its rule updates
    on a device norm (no host read), or host values, which its rule updates on a CPU norm
    (:func:`_reads_on_host`). Each form is made from the other, once, when the norm's device changes
    or the state is read (``state_dict``, a statistic): :meth:`_on_host`, :meth:`_on_device`."""

    _host: Any = None  # the host form, while the state is held there

    def _on_host(self) -> Any:
        """The state's host form (made from the device tensors once, after device steps)."""
        if self._host is None:
            self._host = self._host_form()
        return self._host

    def _on_device(self) -> None:
        """Write a state held in its host form back into the device tensors (before a device step or a read)."""
        if self._host is not None:
            host, self._host = self._host, None
            self._device_form(host)

    def _host_form(self) -> Any:
        raise NotImplementedError

    def _device_form(self, host: Any) -> None:
        raise NotImplementedError


class _Window:
    """:class:`AutoClip`'s window in its host form: the ring of the last finite norms by slot (NaN where
    unfilled, as the device's buffer), the same values in ascending order, and the count seen."""

    def __init__(self, ring: list[float], ordered: list[float], count: int) -> None:
        self.ring, self.ordered, self.count = ring, ordered, count

    def add(self, g: float, window: int) -> None:
        """Take a norm: a finite one replaces the oldest in the ring (slot ``count mod window``) and in
        the order; a non-finite one changes nothing."""
        if not math.isfinite(g):
            return
        slot = self.count % window
        old = self.ring[slot]
        if old == old:  # (a filled slot)
            del self.ordered[bisect.bisect_left(self.ordered, old)]
        self.ring[slot] = g
        bisect.insort(self.ordered, g)
        self.count += 1


def _float32(x: float) -> float:
    """``x`` rounded to float32 (to nearest, as ``Tensor.to(torch.float32)``; beyond its range: ±inf)."""
    try:
        return float(struct.unpack("f", struct.pack("f", x))[0])
    except OverflowError:
        return math.copysign(math.inf, x)


class AutoClip(_TwoForms, NormClipper):
    """AutoClip (Seetharaman, Wichern, Pardo, Le Roux, MLSP 2020): τ_t = p-th percentile of past norms.

    The history (current norm included) lives in a fixed window of the last ``window`` finite
    norms on device; the percentile is numpy's/torch's linear interpolation over them. A
    non-finite step changes nothing (no slot, no count), so it never enters the percentile. The paper
    recommends p = 10 (it clips ~90% of steps by design: judge it by progress, not clip rate).

    Per step: one write into the ring buffer, one partial sort (``topk`` of the few smallest
    values the percentile can need), and a table lookup of the two ranks and the interpolation
    weight for the number of norms in the window (the same float32 ranks as
    :func:`torch.nanquantile`), all on device. On a CPU norm (:func:`_reads_on_host`) the window is
    kept on the host, in order (:class:`_Window`), and one ``lerp`` of the two values picked makes τ:
    the device path's numbers, bit for bit, in 2 small ops instead of ~12.
    """

    kind = "autoclip"
    usage = "autoclip[:PERCENTILE] (default 10)"

    def __init__(self, percentile: float = 10.0, window: int = 1000) -> None:
        try:
            pct = float(percentile)
        except (TypeError, ValueError):
            pct = math.nan
        if not 0.0 < pct <= 100.0:
            raise GradGuardError(
                f'percentile must be in (0, 100], got {percentile!r}. The paper\'s choice is 10 ("autoclip:10").'
            )
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise GradGuardError(f"window must be a positive int, got {window!r}. The default is 1000 steps.")
        self.percentile = pct
        self.window = window
        self._host = None
        self._count = torch.zeros((), dtype=torch.long)  # finite norms seen, on device
        self._set_history(torch.full((window,), math.nan, dtype=torch.float32))

    @classmethod
    def from_arg(cls, arg: str | None) -> AutoClip:
        return cls(spec_number(arg, 10.0))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "percentile": self.percentile, "window": self.window}

    def _set_history(self, history: Tensor) -> None:
        """Take ``history`` (``window`` norms, NaN where unfilled) and build, on its device, the ring
        buffer and the lookup tables of :meth:`threshold`."""
        w = self.window
        if tuple(history.shape) != (w,):
            raise GradGuardError(
                f"AutoClip history has shape {tuple(history.shape)}, expected ({w},) for window={w}. "
                "Load a state saved by an AutoClip with the same window, or start the clipper fresh."
            )
        device = history.device
        # the 'linear' percentile of n sorted values lerps the values at ranks ⌊r⌋ and ⌈r⌉ by r − ⌊r⌋,
        # r = q·(n − 1) in float32 as torch.nanquantile computes it; tabulated for n = 0…window
        q = torch.tensor(self.percentile / 100.0, dtype=torch.float32)
        ranks = (q * (torch.arange(w + 1) - 1)).clamp_min(0.0)
        below = ranks.to(torch.long)
        above = ranks.ceil().to(torch.long)
        k = int(above[-1]) + 1  # the percentile never needs more than the k smallest norms (a CPU tensor)
        # ring buffer: the window, then a spare slot that takes the writes of non-finite norms
        spare = torch.full((1,), math.nan, dtype=torch.float32, device=device)
        self._buf = torch.cat([history.detach().to(torch.float32), spare])
        self._window_view = self._buf[:w]
        # [the k smallest norms (written by topk) | the interpolation weights]; a row of `_take` holds
        # the positions in it of the two values and the weight for n norms in the window
        vals = torch.cat([torch.full((k,), math.nan, dtype=torch.float32), ranks - below])
        take = torch.stack([below, above, k + torch.arange(w + 1)], 1)
        self._vals, self._take = vals.to(device), take.to(device)
        # the same lookup for the host form: for n norms, (rank below, rank above, float32 weight)
        # host sync: none, CPU tables made at construction
        self._host_ranks = list(zip(below.tolist(), above.tolist(), (ranks - below).tolist()))
        self._topk_out = (self._vals[:k], torch.empty(k, dtype=torch.long, device=device))
        # the two values and the weight picked for this step, and 0-D views of them for the lerp
        self._picked = torch.empty(1, 3, dtype=torch.float32, device=device)
        self._lerp_args = self._picked[0].unbind()
        self._spare = torch.tensor(w, device=device)
        self._count = self._count.to(device)

    def _to(self, device: torch.device) -> None:
        self._on_device()
        self._set_history(self._window_view.to(device))

    def _host_form(self) -> _Window:
        ring = self._window_view.tolist()  # host sync: once, when the norm moves to the CPU
        return _Window(ring, sorted(x for x in ring if x == x), int(self._count))  # (unfilled slots: NaN)

    def _device_form(self, host: _Window) -> None:
        device = self._buf.device
        self._count = torch.tensor(host.count, device=device)
        self._set_history(torch.tensor(host.ring, dtype=torch.float32, device=device))

    def threshold(self, norm: Tensor) -> Tensor:
        if _reads_on_host(norm):
            return self._threshold_on_host(norm)
        self._on_device()
        if self._buf.device != norm.device:
            self._to(norm.device)
        g = norm.detach() if norm.requires_grad else norm
        if g.dim():
            g = g.reshape(())
        if g.dtype != torch.float32:
            g = g.to(torch.float32)  # a float64 norm beyond float32's range is non-finite here
        finite = g.abs() < math.inf
        count = self._count
        # a non-finite norm goes to the spare slot (never read) and is not counted
        slot = torch.where(finite, count.remainder(self.window), self._spare)
        self._buf.index_put_((slot,), g)
        self._count = count = count + finite
        # the k smallest norms of the window, ascending (unfilled NaN slots sort last, past any rank used)
        torch.topk(self._window_view, self._topk_out[0].shape[0], largest=False, out=self._topk_out)
        rows = self._take.index_select(0, count.clamp_max(self.window))
        torch.take(self._vals, rows, out=self._picked)
        return torch.lerp(*self._lerp_args)

    def _threshold_on_host(self, norm: Tensor) -> Tensor:
        """:meth:`threshold` with the window on the host: the same ring of finite norms (as float32),
        kept in order, and the same float32 ``lerp`` of the two values the ranks pick."""
        window = self._on_host()
        window.add(_float32(float(norm)), self.window)  # host sync: a CPU value
        below, above, weight = self._host_ranks[min(window.count, self.window)]
        ordered, nan = window.ordered, math.nan
        lo, hi = (
            ordered[i] if i < len(ordered) else nan for i in (below, above)
        )  # (none yet: NaN, as the device's)
        return torch.lerp(*torch.tensor([lo, hi, weight], dtype=torch.float32).unbind())

    def state_dict(self) -> dict[str, Any]:
        self._on_device()
        return {
            **super().state_dict(),
            "percentile": self.percentile,
            "window": self.window,
            "history": self._window_view.detach().clone(),
            "count": self._count.detach().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._host = None
        self.percentile = float(state["percentile"])
        self.window = int(state["window"])
        history = state["history"].detach()
        self._count = torch.as_tensor(state["count"], dtype=torch.long).detach().clone().reshape(())
        self._set_history(history)

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile}, window={self.window})"


# ----------------------------------------------------------------------------- ZClip's rule, written once
_Z_HINT = "It is a z-score: a norm this many standard deviations above its running mean is a spike (the paper uses 2.5)."
_EPS_HINT = "It is a small positive floor, e.g. 1e-6."


def _zclip_params(alpha: float, z_thresh: float, warmup: int, eps: float) -> tuple[float, float, int, float]:
    """ZClip's parameters, checked: (alpha, z_thresh, warmup, eps)."""
    if not 0.0 < float(alpha) < 1.0:
        raise GradGuardError(f"alpha must be in (0, 1), got {alpha!r}. The paper uses 0.97.")
    zt = float(_check_threshold(z_thresh, "z_thresh", allow_inf=False, hint=_Z_HINT))
    if zt <= 0:
        raise GradGuardError(f"z_thresh must be > 0, got {z_thresh!r}. The paper uses 2.5.")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
        raise GradGuardError(f"warmup must be a positive int, got {warmup!r}. The paper uses 25.")
    return float(alpha), zt, warmup, float(_check_threshold(eps, "eps", allow_inf=False, hint=_EPS_HINT))


def _zclip_rows(alpha: float, z_thresh: float, warmup: int) -> list[list[list[float]]]:
    """ZClip's update as data: for each count n of finite norms seen (0 … warmup; the last row
    stays), ``[z threshold ×3, A, B]`` of ``[μ, σ², n] ← A·[μ, σ², n] + B·[Δ, Δ², 1]``, Δ = g' − μ."""
    rows = []
    for n in range(warmup):  # Welford, k = 1/(n+1): μ + kΔ, (1−k)σ² + k(1−k)Δ², n + 1
        k = 1.0 / (n + 1)
        rows.append([[math.inf] * 3, [1.0, 1.0 - k, 1.0], [k, k * (1.0 - k), 1.0]])
    # EMA of the clipped value g' = μ + Δ: αμ + (1−α)g' = μ + (1−α)Δ and, since g' − μ_new = αΔ,
    # ασ² + (1−α)(g' − μ_new)² = ασ² + (1−α)α²Δ²; n stays at warmup. The z threshold is inf
    # during the warm-up: no clipping then.
    a = alpha
    rows.append([[z_thresh] * 3, [1.0, a, 1.0], [1.0 - a, (1.0 - a) * a * a, 0.0]])
    return rows


class _Arith(Protocol):
    """The arithmetic the rules of :class:`ZClip` and :class:`Auto` run on: device tensors
    (:class:`_TensorArith`, no host read) or host floats (:class:`_FloatArith`, where the norm is a
    CPU value: reading it waits for no device). Each rule is written once, over this."""

    eps: Any  # ZClip's eps
    zt2: Any  # z_thresh²
    inf: Any
    nan: Any
    device: torch.device  # where the tensors it reads are made

    def split(self, s: Any) -> tuple[Any, Any, Any]: ...  # the state → μ, σ², n (an index)
    def row(self, n: Any) -> tuple[Any, Any, Any]: ...  # the z threshold, A, B for n
    def update(self, a: Any, s: Any, b: Any, delta: Any) -> Any: ...  # A·s + B·[Δ, Δ², 1]
    def where(self, c: Any, x: Any, y: Any) -> Any: ...
    def sqrt(self, x: Any) -> Any: ...
    def div(self, x: Any, y: Any) -> Any: ...  # IEEE: x/0 is ±inf or NaN
    def minimum(self, x: Any, y: Any) -> Any: ...  # NaN if either is NaN
    def isnan(self, x: Any) -> Any: ...
    def isfinite(self, x: Any) -> Any: ...
    def scale(self, x: Any, factors: tuple[float, ...]) -> Any: ...  # [x·f for f in factors]
    def lookup(self, table: tuple[float, ...], n: Any) -> Any: ...  # table[n]
    def scalar(self, x: Tensor) -> Any: ...  # a 0-D tensor (the loss, a learning rate) as a float64 value
    def largest(self, xs: list[Any]) -> Any: ...  # the largest of numbers and tensors


def _zclip_step(r: _Arith, s: Any, g: Any) -> tuple[Any, Any, Any, Any, Any]:
    """ZClip's rule for one norm ``g`` (Kumar et al. 2025), the one implementation of it.

    With ``z = (g − μ)/(σ + eps)``, a spike is ``z > z_thresh`` (never during the warm-up), its
    threshold ``τ = μ + z_thresh²·σ/z``, and the state ``s`` = [μ, σ², n] moves by the row of
    :func:`_zclip_rows` for n with the clipped value ``g' = μ + Δ``. A non-finite norm is no spike and
    leaves the state as it is. Written without branches over ``r``'s arithmetic, so it runs on
    device tensors (:class:`ZClip`: no host read) and on host floats (:class:`ZClip` on a CPU norm,
    :class:`HostZClip`).

    Returns (the new state, τ (inf when no spike), the spike flag, the finite flag, n before the step).
    """
    mean, var, n = r.split(s)
    zt, a, b = r.row(n)
    d = g - mean
    d = d + d * 0.0  # ±inf → NaN: a non-finite norm gives no spike and leaves the state as it is
    finite = r.inf > d
    std = r.sqrt(var)
    z = r.div(d, std + r.eps)
    spike = z > zt  # never during the warm-up (zt = inf) nor for a non-finite norm
    off = r.div(r.zt2 * std, z)  # τ − μ on a spike
    delta = r.where(spike, off, d)  # g' − μ
    new = r.where(finite, r.update(a, s, b, delta), s)
    return new, r.where(spike, mean + off, r.inf), spike, finite, n


class _TensorArith:
    """:func:`_zclip_step` on device: the state is a (1, 3) float64 tensor, the rows a table indexed
    on device by n (spike, τ and Δ come out as (1, 3) with 3 equal values, so one ``addcmul`` updates
    all three statistics); about 20 small ops, no host read. The constant tables of :class:`Auto`'s
    caps are made on the device once (:meth:`scale`, :meth:`lookup`)."""

    nan = math.nan

    def __init__(
        self, rows: list[list[list[float]]], eps: float, z_thresh: float, device: torch.device
    ) -> None:
        self.device = device
        self.table = torch.tensor(rows, dtype=torch.float64).to(device)
        # Δ ** powers = [Δ, Δ², 1]; eps; z_thresh²; inf
        consts = torch.tensor([1.0, 2.0, 0.0, eps, z_thresh**2, math.inf], dtype=torch.float64).to(device)
        self.powers, self.eps, self.zt2, self.inf = consts.split((3, 1, 1, 1))
        self._tables: dict[tuple[float, ...], Tensor] = {}

    @staticmethod
    def split(s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, var, n = s.unbind(1)  # (1,) each
        return mean, var, n.long()  # n ≤ warmup

    def row(self, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        zt, a, b = self.table.index_select(0, n).unbind(1)  # (1, 3) each
        return zt, a, b

    def update(self, a: Tensor, s: Tensor, b: Tensor, delta: Tensor) -> Tensor:
        return torch.addcmul(a * s, b, delta.pow(self.powers))

    @staticmethod
    def where(c: Tensor, x: Tensor, y: Tensor | float) -> Tensor:
        return torch.where(c, x, y)  # (the three-argument form; torch.where's overloads begin with one)

    sqrt = staticmethod(torch.sqrt)
    div = staticmethod(torch.div)
    minimum = staticmethod(torch.minimum)
    isnan = staticmethod(torch.isnan)
    isfinite = staticmethod(torch.isfinite)

    def table_for(self, values: tuple[float, ...]) -> Tensor:
        """``values`` as a float64 tensor on the device, made once."""
        t = self._tables.get(values)
        if t is None:
            t = self._tables[values] = torch.tensor(values, dtype=torch.float64).to(self.device)
        return t

    def scale(self, x: Tensor, factors: tuple[float, ...]) -> Tensor:
        return x * self.table_for(factors)

    def lookup(self, table: tuple[float, ...], n: Tensor) -> Tensor:
        return self.table_for(table).index_select(0, n)

    def scalar(self, x: Tensor) -> Tensor:
        return x.detach().to(device=self.device, dtype=torch.float64).reshape(())

    def largest(self, xs: list[Any]) -> Tensor:
        return torch.stack([self.scalar(torch.as_tensor(x)) for x in xs]).max()


class _FloatArith:
    """:func:`_zclip_step` and :class:`Auto`'s caps on the host: the state is a tuple (μ, σ², n) of
    Python floats (float64, as the device state; each operation rounded once, IEEE)."""

    inf = math.inf
    nan = math.nan
    device = torch.device("cpu")  # where tensors it reads (the trust cap's ratios) are made

    def __init__(self, rows: list[list[list[float]]], eps: float, z_thresh: float) -> None:
        self.rows = [(zt[0], a, b) for zt, a, b in rows]
        self.eps, self.zt2 = eps, z_thresh**2

    @staticmethod
    def split(s: tuple[float, float, float]) -> tuple[float, float, int]:
        return s[0], s[1], int(s[2])

    def row(self, n: int) -> tuple[float, list[float], list[float]]:
        return self.rows[n]

    @staticmethod
    def update(a: list[float], s: tuple[float, ...], b: list[float], delta: float) -> tuple[float, ...]:
        return a[0] * s[0] + b[0] * delta, a[1] * s[1] + b[1] * (delta * delta), a[2] * s[2] + b[2]

    @staticmethod
    def where(c: bool, x: Any, y: Any) -> Any:
        return x if c else y

    sqrt = staticmethod(math.sqrt)
    isnan = staticmethod(math.isnan)
    isfinite = staticmethod(math.isfinite)

    @staticmethod
    def div(x: float, y: float) -> float:
        if y:
            return x / y
        return math.nan if x == 0 or math.isnan(x) else math.copysign(math.inf, x) * math.copysign(1.0, y)

    @staticmethod
    def minimum(x: float, y: float) -> float:
        return x if x != x or x < y else y  # NaN if either is (y < x is False for a NaN y: y)

    @staticmethod
    def scale(x: float, factors: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(x * f for f in factors)

    @staticmethod
    def lookup(table: tuple[float, ...], n: int) -> float:
        return table[n]

    @staticmethod
    def scalar(x: Tensor) -> float:
        return float(x)  # host sync: none, a CPU value (the host arithmetic runs on CPU norms only)

    @staticmethod
    def largest(xs: list[Any]) -> float:
        return max(float(x) for x in xs)  # host sync: CPU values (a tensor learning rate on the CPU)


class ZClip(_TwoForms, NormClipper):
    """ZClip (Kumar, Owen, Roy Chowdhury, Güra 2025): z-score spike clipping with EMA statistics.

    The first ``warmup`` finite norms give μ and σ² (no clipping meanwhile). After that, with
    ``z = (g − μ)/(σ + eps)``: if ``z > z_thresh`` the threshold is ``τ = μ + z_thresh²·σ/z``
    (bigger spikes are clipped harder), and μ, σ² follow an EMA (``alpha``) of the *clipped*
    value: ``μ ← αμ + (1−α)g'``, ``σ² ← ασ² + (1−α)(g' − μ)²``. Non-finite norms change nothing.
    ``max_norm`` optionally caps τ (the PyPI package caps at 1.0 by default; here off).

    Both phases are one update ``[μ, σ², n] ← A·[μ, σ², n] + B·[Δ, Δ², 1]`` with ``Δ = g' − μ``,
    whose coefficients A, B (and the z threshold, inf during the warm-up) are looked up on
    device by the count n of finite norms seen: about 20 small ops per step, no host sync. The rule
    is :func:`_zclip_step`, shared with :class:`HostZClip`.

    On a CPU norm (reading it waits for no device) the same rule runs on host floats instead: no
    small tensor ops, a few µs a step (:func:`_reads_on_host`; the state moves between the two
    forms when the norm's device changes, and is the same float64 numbers in both, up to the
    rounding of a fused multiply-add where the device's ``addcmul`` uses one).
    """

    kind = "zclip"
    usage = "zclip[:Z_THRESH] (default 2.5)"

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup: int = 25,
        eps: float = 1e-6,
        max_norm: float | None = None,
    ) -> None:
        self.alpha, self.z_thresh, self.warmup, self.eps = _zclip_params(alpha, z_thresh, warmup, eps)
        self.max_norm = None if max_norm is None else float(_check_threshold(max_norm, "max_norm"))
        # μ, σ² (population variance of the warm-up norms, then the EMA) and the number of finite
        # norms seen (it stops at warmup); float64 on the norm's device.
        self._set_state(torch.zeros(3, dtype=torch.float64))

    @classmethod
    def from_arg(cls, arg: str | None) -> ZClip:
        return cls(z_thresh=spec_number(arg, 2.5))

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup": self.warmup,
            "eps": self.eps,
            "max_norm": self.max_norm,
        }

    def _set_state(self, stats: Tensor) -> None:
        """Take ``stats`` ([μ, σ², n]) as the state and build the rule's tables on its device and
        for the host."""
        self._host = None  # (a state loaded or moved: no host form yet)
        self._state = stats.detach().to(torch.float64).reshape(1, 3)
        rows = _zclip_rows(self.alpha, self.z_thresh, self.warmup)
        self._rule = _TensorArith(rows, self.eps, self.z_thresh, self._state.device)
        self._host_rule = _FloatArith(rows, self.eps, self.z_thresh)

    def _to(self, device: torch.device) -> None:
        self._on_device()
        self._set_state(self._state.to(device))

    # The two forms of the state (:class:`_TwoForms`): the device tensors of :meth:`_held`, or their
    # values as tuples of host floats.
    def _held(self) -> tuple[Tensor, ...]:
        """The state's device tensors, in the order :meth:`_rule_step` takes them."""
        return (self._state,)

    def _hold(self, parts: tuple[Tensor, ...]) -> None:
        (self._state,) = parts

    def _host_form(self) -> tuple[tuple[float, ...], ...]:
        return tuple(
            tuple(t.reshape(-1).tolist()) for t in self._held()
        )  # host sync: once, when the norm moves to the CPU

    def _device_form(self, host: tuple[tuple[float, ...], ...]) -> None:
        held = self._held()
        self._hold(
            tuple(
                torch.tensor(h, dtype=t.dtype, device=t.device).reshape(t.shape) for t, h in zip(held, host)
            )
        )

    def _rule_step(self, r: _Arith, parts: tuple[Any, ...], g: Any) -> tuple[tuple[Any, ...], Any, Any, Any]:
        """The rule for one norm on ``r``'s arithmetic: (the new state, τ, the finite flag, n before)."""
        new, tau, _, finite, n = _zclip_step(r, parts[0], g)
        return (new,), tau, finite, n

    def _observe(self, norm: Tensor) -> tuple[Any, Any, Any]:
        """Update the state with a finite ``norm``; return (τ, the finite flag, the count n before the
        update): on device, τ float64 of shape (1, 3) with 3 equal values, the others of shape (1,);
        on a CPU norm (:func:`_reads_on_host`), host numbers."""
        if _reads_on_host(norm):
            host_g = float(norm)  # host sync: a CPU value
            self._host, tau, finite, n = self._rule_step(self._host_rule, self._on_host(), host_g)
            return tau, finite, n
        self._on_device()
        if self._state.device != norm.device:
            self._to(norm.device)
        g = norm.detach() if norm.requires_grad else norm
        parts, tau, finite, n = self._rule_step(self._rule, self._held(), g)
        self._hold(parts)
        return tau, finite, n

    def zeroes_every_gradient(self) -> bool:
        """True with a cap ``max_norm`` of 0 (every step after the warm-up is clipped to nothing)."""
        return self.max_norm is not None and _is_zero(self.max_norm)

    def threshold(self, norm: Tensor) -> Tensor:
        tau = self._threshold_value(norm)
        # (scalar_tensor ≈1 µs, torch.tensor ≈2.5)
        return torch.scalar_tensor(tau, dtype=torch.float32) if isinstance(tau, float) else tau

    def _threshold_value(self, norm: Tensor) -> Tensor | float:
        """:meth:`threshold`, as a host float where the rule ran on the host (a CPU norm), rounded as
        the device path's ``.to(float32)`` (a value beyond float32's range is inf): the guard writes
        it into the step's row itself, no op."""
        if _rule_kernel.usable(norm):  # a GPU: the rule in one launch, where the kernel knows the step
            found = self._kernel_threshold(norm)
            if found is not None:
                return found
        tau = self._observe(norm)[0]
        if isinstance(tau, float):  # on the host
            cap = math.inf if self.max_norm is None else self.max_norm
            return _float32(_FloatArith.minimum(tau, cap))
        if self.max_norm is not None:
            tau = tau.clamp_max(self.max_norm)
        return tau[0, 0].to(torch.float32)

    def _kernel_threshold(self, norm: Tensor) -> Tensor | None:
        """:meth:`threshold` by :mod:`gradguard._rule_kernel` (the state updated in place), or None
        where the kernel does not take this step (the tensor path then)."""
        self._on_device()
        if self._state.device != norm.device:
            self._to(norm.device)
        step = self._kernel_step(norm)
        return None if step is None else _rule_kernel.threshold(self._held(), norm, step)

    def _kernel_step(self, norm: Tensor) -> _rule_kernel.Step | None:
        """What the kernel needs for this step besides the state (None: the tensor path)."""
        r = self._rule
        return _rule_kernel.Step(
            r.table, r.eps, r.zt2, self.warmup, math.inf if self.max_norm is None else self.max_norm
        )

    @property
    def mean(self) -> Tensor:
        """EMA mean of the (clipped) norms, on device."""
        self._on_device()
        return self._state[0, 0].clone()

    @property
    def std(self) -> Tensor:
        """EMA standard deviation of the (clipped) norms, on device."""
        self._on_device()
        return self._state[0, 1].sqrt()

    def state_dict(self) -> dict[str, Any]:
        self._on_device()
        return {
            **super().state_dict(),
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup": self.warmup,
            "eps": self.eps,
            "max_norm": self.max_norm,
            "stats": self._state.detach().reshape(3).clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.alpha = float(state["alpha"])
        self.z_thresh = float(state["z_thresh"])
        self.warmup = int(state["warmup"])
        self.eps = float(state["eps"])
        self.max_norm = None if state["max_norm"] is None else float(state["max_norm"])
        stats = state["stats"].detach().to(torch.float64).reshape(3).clone()
        stats[:2].clamp_min_(0.0)  # a mean of norms and a variance ≥ 0 (the update keeps them so)
        stats[2:].nan_to_num_(0.0).clamp_(0, self.warmup)  # the count indexes the update table (no host read)
        self._set_state(stats)

    def __repr__(self) -> str:
        return f"ZClip(alpha={self.alpha}, z_thresh={self.z_thresh}, warmup={self.warmup}, max_norm={self.max_norm})"


#: Optimizers whose step is ``lr`` × the gradient (or a running mean of it, with momentum): the size of
#: their update follows the gradient's norm, so :class:`Auto` bounds it through the learning rate.
#: Adaptive optimizers (Adam, AdamW, Adagrad, RMSprop, …) divide by a running scale of the gradient,
#: so their step is already about ``lr`` per element whatever the norm: no learning-rate cap there.
PLAIN_UPDATE: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.SGD, torch.optim.ASGD)


class Auto(ZClip):
    """The ``"auto"`` clipper: no SGD step longer than a fraction of the Polyak step, and ZClip's spike
    clipping — right without tuning across learning rates, loss scales and optimizers.

    **Why the learning rate and the loss.** What decides whether a step destabilizes training is
    the size of the *update*, not of the gradient: plain SGD moves the weights by ``lr·g``, so a
    fixed threshold τ lets through updates of ``lr·τ`` — safe at one learning rate, an explosion
    at a higher one (measured: success follows lr × τ). How long a step may be depends on the
    problem; the Polyak step ``f/‖g‖²`` (loss over squared gradient norm, for a loss ≥ 0) is the
    step that would bring a linear model of the loss to zero, and no sensible step is longer.
    ``auto`` caps the SGD step at ``polyak`` times it — the stochastic Polyak step size "SPS_max"
    of Loizou, Vaswani, Laradji & Lacoste-Julien (AISTATS 2021), written as a clip::

        lr·‖g_clipped‖ ≤ polyak · f / ‖g‖,   i.e.   τ ≤ polyak · f / (lr · ‖g‖)

    with f the step's loss and lr the largest learning rate of the optimizer's groups (read from
    ``param_groups`` at every step: schedulers are followed; a tensor lr stays on device). The cap
    halves when lr doubles; the update it allows does not depend on the loss's units (a loss k×
    larger has k× larger gradients) and grows with the weights' scale (weights k× larger have k×
    smaller gradients). It applies to optimizers whose step is lr × the gradient
    (:data:`PLAIN_UPDATE`: SGD, ASGD). Adam-like optimizers already take steps of about lr per
    element whatever the gradient's norm: there ``auto`` keeps only the spike and growth rules
    below, and never clips a healthy run.

    The guard binds the optimizer (:meth:`attach`) and hands each step's loss
    (:meth:`observe_loss`: the loss you pass to ``guard.step(loss)``; under gradient accumulation
    pass the accumulated loss, not the last micro-batch's share, or the cap is that many times
    tighter). Without a loss > 0 (no loss passed, or a loss that can be negative), and for a
    clipper used on its own before ``attach(optimizer)``, the cap is ``first`` × the first finite
    norm instead (the previous ``auto``, blind to the learning rate).

    **Spikes and slow growth.** ZClip's z-score rule clips outliers; a slow, steady growth of the
    norm moves its EMA with it, so τ is also capped at ``growth`` × the mean of the warm-up norms.

    **Warm-up** (``ramp``). The Polyak step trusts a linear model of the loss down to 0, which is
    furthest from the truth at initialization (a cross-entropy at chance, ``log K``, allows long
    steps that the curvature does not). So the cap ramps up over ZClip's warm-up, as a learning-rate
    warm-up does: the k-th finite step gets ``√(k/warmup)`` of it (1/5 on the first step with the
    default 25, the full cap from step 25 on). Measured: on temporal order at length 20 and SGD lr
    1-3, the unramped cap let first steps of 0.3-1.1 (5-18 % of ‖w‖) through and 4 of 10 runs stayed
    at chance; ramped, 9 of 10 train. A linear ramp (1/25 on the first step) does as well there but
    slows a healthy SGD run (5 % higher final loss); the square root leaves it within 1 %.

    **Reading its clip rate.** Under SGD the Polyak cap is a step-size rule, not an outlier filter:
    when the loss falls faster than the gradient shrinks (a run converging, a loss going to 0) it
    binds on most steps, and the record's ``clip_fraction`` (the gradient was scaled: the
    mechanical fact every clipper reports) reads 95-99 % on runs that train best. Judge ``auto`` by
    the loss, as ``gradguard diagnose`` does for every adaptive clipper (``over_clipping`` needs a
    stalled loss, not a high rate); under Adam-like optimizers only spikes and growth are clipped,
    and the rate is that of outliers (1-2 % on healthy runs) — except after a lasting rise of the norm,
    which the statistics of the clipped norms do not follow (a small transformer whose norm rises
    3-10× as it learns: 92 % clipped at Adam 3e-3, the outcome unharmed; ``benchmarks/adam_healthy.py``).

    **Per-layer trust ratio** (``trust``, opt-in, session 13; not in the ``"auto"`` spec). The Polyak
    cap bounds the step of the whole network; one layer can still move too far. ``trust`` adds the
    trust ratio of LARS (You, Gitman & Ginsburg 2017) and AGC (Brock et al. 2021) as one more cap on
    the global threshold: no matrix (rank ≥ 2 weight; a zero-initialised one, of norm 0, is left out)
    moves more than ``trust`` of its norm in a step, counting the momentum β (dampening d) that lets
    aligned steps add up to ``(1 − d)/(1 − β)`` times the gradient step::

        lr·(1 − d)/(1 − β) · ‖g_l‖·(τ/‖g‖) ≤ trust · ‖w_l‖   for every matrix l

    (lr·gain: the largest over the optimizer's groups). The gradient norms come from
    :meth:`observe_norms` where the caller hands them, else a second read of the gradients; the weight
    norms cost one read of the matrices per step. Measured (session 13, ``benchmarks/auto_momentum.py``
    and ``benchmarks/pascanu.py``; benchmarks/README.md): ``trust=0.1`` trains the char transformer
    below at SGD lr 1, momentum 0.9 (3/3 against 0/3) and the momentum classifiers 18/18 (16/18),
    temporal order at 20 20/20 (19/20), adding at 10 16/20 (12/20) — but stalls the char-LSTM recipe
    (plain SGD, a loss summed over time: 0/15 against 12/15; the cap holds τ at 2-5 for norms of 5-19), and
    looser values that let the LSTM through (``trust=0.3``: 4/6 against 5/6, ``1``: 6/6) are too loose
    for the transformer (``trust=0.3``: 0/3, 3.86-3.93 bits/char). No single value serves both, so it
    stays opt-in.

    **Known limit: a loss floor far above 0, with momentum.** The Polyak step takes the loss down
    to 0; a language model's loss cannot go below the text's entropy, so the cap is
    ``f/(f − f*)`` times too long (3× at the unigram level), and momentum makes the update 1.5-2×
    the clipped gradient. On ``benchmarks/transformer_lr.py`` (post-LN, SGD lr 1, momentum 0.9, no
    warm-up) ``auto`` moves the weights 1-2.5 % per step where ``norm:0.15`` moves them 0.4-0.7 %, and
    misses the target (0/3; ``tune``'s threshold 3/3). Dividing the cap by ``1/(1 − β)`` fixes that
    run (3/3) but over-clips healthy momentum classifiers (a CNN at lr 0.1: test accuracy 0.85-0.86
    against 0.93-0.94), and no single factor serves both (``benchmarks/auto_momentum.py``): the fix
    needs an estimate of ``f*``; ``Auto(trust=0.1)`` (above) trains it at the char-LSTM's cost. Use
    ``gradguard tune`` there.

    Measured (``benchmarks/pascanu.py``: adding and temporal-order problems with a tanh RNN at two
    lengths each and the textbook char-LSTM recipe; plain SGD over a grid of learning rates, 5
    seeds; success = the task's target with no non-finite step; see benchmarks/README.md):
    successes out of 20 runs per group (lr 0.1, 0.3, 1, 3 × 5 seeds) — adding at length 5: ``auto``
    16, the best fixed threshold chosen after the fact 8 (``norm:3``), no clipping 4; adding at 10:
    12, 4 (``norm:1``), 2; temporal order at 10: 20, 20, 10; at 20: 19, 17 (``norm:0.1``), 0. The
    char-LSTM recipe (lr 0.25/1/4 × 5 seeds, 400 steps, target 3.6 bits/char): 12/15, 7/15
    (``norm:1``), 0/15. ``auto`` ≥ the best fixed threshold in every group; all five: 79/95 against
    56/95 for hindsight and 16/95 unclipped (4.9×). Without the ramp (session 11): 17, 13, 20, 16,
    13 — one run short of hindsight on order-20. A tanh MLP regression at SGD lr 3 and 10 ends at
    MSE 0.012 (from 0.60) where the first ``auto`` (half the first norm) ends at 1.3 and 57; the
    ``rnn`` demo (LSTM, lr 1, seed 0) reaches 2.84 bits/char (session 11's ``auto`` 2.83, the first
    2.85-2.98). Healthy runs (session 11, unaffected by the ramp after step 25): AdamW on a small
    char transformer clips 1-2 % of its steps; SGD with momentum 0.9 on an MLP classifier 4 % (lr
    0.01), 14 % (lr 0.05) and 43 % (lr 0.1, ending at a lower loss than unclipped: 0.13 against
    0.23). A run whose loss goes to 0 (Deep SAD in ``gradguard demo``, seed 0) is held at the Polyak
    step on most steps (99 % clipped; loss 0.0075, ROC-AUC 0.992; the first ``auto`` 0.008-0.010).

    Args:
        growth: the cap after the warm-up, in units of the warm-up mean (≥ 1).
        first: the cap from the second step on, in units of the first finite norm (> 0), or
            ``None``: with ``polyak`` set only where the Polyak cap is unavailable (see above);
            without ``polyak``, on every step (``Auto(first=0.5)`` is the previous ``auto``).
        polyak: the longest SGD step, as a fraction of the Polyak step (> 0), or ``None`` for no
            such cap. The ``"auto"`` spec uses 0.5.
        ramp: ramp the Polyak cap up over the warm-up (``√(k/warmup)`` on the k-th finite step).
            The ``"auto"`` spec uses True; False (the default here, and in states saved before it
            existed) is the session-11 ``auto``.
        trust: the longest momentum-amplified SGD step of one matrix, as a fraction of its norm
            (> 0), or ``None`` for no such cap (the default, the ``"auto"`` spec, and states saved
            before it existed). Opt-in: see "Per-layer trust ratio".
        **zclip: :class:`ZClip`'s ``alpha``, ``z_thresh``, ``warmup``, ``eps``, ``max_norm``.
    """

    kind = "auto"
    takes_loss = True
    usage = "auto (SGD steps ≤ half the Polyak step f/|g|², ramped over the warm-up; ZClip spikes; 10x the warm-up norm)"
    #: what the ``"auto"`` spec builds
    SPEC: ClassVar[dict[str, Any]] = {"polyak": 0.5, "first": 0.5, "ramp": True}

    def __init__(
        self,
        growth: float = 10.0,
        first: float | None = None,
        polyak: float | None = None,
        ramp: bool = False,
        trust: float | None = None,
        **zclip: Any,
    ) -> None:
        super().__init__(**zclip)
        if not isinstance(ramp, bool):
            raise GradGuardError(f'ramp must be True or False, got {ramp!r}. The "auto" spec uses True.')
        self.ramp = ramp
        self.growth = float(_check_threshold(growth, "growth", allow_inf=False, hint="The default is 10."))
        if self.growth < 1:
            raise GradGuardError(f"growth must be ≥ 1, got {growth!r}. The default is 10.")
        self.first = _positive_or_none(first, "first", 'The "auto" spec uses 0.5.')
        self.polyak = _positive_or_none(polyak, "polyak", 'The "auto" spec uses 0.5.')
        self.trust = _positive_or_none(trust, "trust", "0.1 is the value measured in benchmarks/README.md.")
        self._optimizer: torch.optim.Optimizer | None = None
        self._matrices: list[Tensor] = []  # the optimizer's rank ≥ 2 parameters (the trust cap's layers)
        self._grad_norms: tuple[Sequence[Tensor], Tensor] | None = None  # handed by the guard this step
        self._index: tuple[Sequence[Tensor], list[Tensor], Tensor] | None = None  # (params, mats, where)
        self._loss: Tensor | None = None
        self._set_anchor(torch.full((), math.nan, dtype=torch.float64))
        self._set_first(torch.full((), math.nan, dtype=torch.float64))

    @classmethod
    def from_arg(cls, arg: str | None) -> Auto:
        spec_no_arg(arg)
        return cls(**cls.SPEC)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "growth": self.growth,
            "first": self.first,
            "polyak": self.polyak,
            "ramp": self.ramp,
            "trust": self.trust,
        }

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Read the learning rate from ``optimizer`` at every step (:class:`gradguard.Guard` calls this)."""
        self._optimizer = optimizer
        dtensor = getattr(
            sys.modules.get("torch.distributed.tensor"), "DTensor", None
        )  # (a sharded weight's norm needs the other ranks: left out of the trust cap)
        self._matrices = [
            p
            for g in optimizer.param_groups
            for p in g["params"]
            if p.ndim >= 2 and not (dtensor is not None and isinstance(p, dtensor))
        ]

    def observe_norms(self, params: Sequence[Tensor], norms: Tensor) -> None:
        """This step's per-tensor gradient norms, already measured (``norms[i]`` is ``params[i]``'s):
        the trust cap reads them instead of the gradients. Valid for the next :meth:`threshold` only."""
        self._grad_norms = (params, norms)

    def observe_loss(self, loss: Tensor | float | None) -> None:
        """The loss of the step about to be clipped (a device tensor is never read on the host);
        ``None``: none. :class:`gradguard.Guard` hands it before every clip."""
        self._loss = None if loss is None else torch.as_tensor(loss)

    @property
    def adaptive(self) -> bool:
        """Bound to an optimizer whose step does not follow the gradient's norm (Adam-like): only the
        spike and growth caps apply."""
        return self._optimizer is not None and not isinstance(self._optimizer, PLAIN_UPDATE)

    def _step_cap_kind(self) -> tuple[int, float | list[Any] | None]:
        """Which step cap applies to this step: ``(NO_CAP, None)`` under an Adam-like optimizer;
        ``(FIRST_CAP, None)`` without ``polyak``, or where the Polyak cap cannot apply (no loss, no
        plain-update optimizer, every learning rate 0); ``(POLYAK_CAP, polyak / lr)`` with lr the largest
        rate of the groups (read now: schedulers are followed), or ``(POLYAK_CAP, the rates)`` where a
        rate is a tensor (capturable / fused: it stays on the device)."""
        if self.polyak is None:
            return FIRST_CAP, None  # the previous auto: the first-norm cap on every step
        if self.adaptive:
            return NO_CAP, None
        if self._loss is None or not isinstance(self._optimizer, PLAIN_UPDATE):
            return FIRST_CAP, None
        lrs = [grp["lr"] for grp in self._optimizer.param_groups if grp["params"]]
        if any(isinstance(lr, Tensor) for lr in lrs):
            return POLYAK_CAP, lrs
        top = max([float(lr) for lr in lrs]) if lrs else 0.0  # (no ``default=``: torch.compile refuses it)
        return (POLYAK_CAP, self.polyak / top) if top > 0 else (FIRST_CAP, None)

    def _polyak_cap(self, r: _Arith, g: Any, lr: float | list[Any]) -> Any:
        """This step's cap ``polyak·f/(lr·‖g‖)`` for the norm ``g`` (float64 on ``r``; NaN where the loss is
        not > 0 or either is not finite); ``lr``: :meth:`_step_cap_kind`'s ``polyak / lr``, or the rates.
        On device: no host read."""
        assert self._loss is not None and self.polyak is not None
        f = r.scalar(self._loss)
        # (the rates, a tensor among them: their largest on the device)
        cap = r.div(f * lr, g) if isinstance(lr, float) else r.div(f * self.polyak, r.largest(lr) * g)
        return r.where((f > 0) & r.isfinite(cap), cap, r.nan)

    def _trust_cap(self, r: _Arith, g: Any) -> Any | None:
        """This step's per-layer cap ``trust·‖g‖ / max_l(lr·gain·‖g_l‖/‖w_l‖)`` over the matrices (float64
        on ``r``; inf where no matrix has a finite positive ratio), or None where it cannot apply (no
        ``trust``, no plain-update optimizer, no matrix with a gradient, every rate 0). The ratios are
        device tensors (on device: no host read)."""
        if self.trust is None or not isinstance(self._optimizer, PLAIN_UPDATE):
            return None
        dev = r.device
        step = _longest_step(self._optimizer.param_groups, dev)
        mats = [p for p in self._matrices if p.grad is not None]
        if step is None or not mats:
            return None
        wn = torch.stack([n.to(dev, torch.float64) for n in torch._foreach_norm([p.detach() for p in mats])])
        ratio = torch.as_tensor(step).to(dev, torch.float64) * self._matrix_grad_norms(mats, dev) / wn
        worst = torch.where(wn > 0, ratio, 0.0).nan_to_num(nan=math.inf).max()  # (a norm-0 matrix: left out)
        cap = r.div(g * self.trust, r.scalar(worst))
        return r.where(r.isfinite(cap) & (cap > 0), cap, math.inf)

    def _matrix_grad_norms(self, mats: list[Tensor], device: torch.device) -> Tensor:
        """The gradient norms of ``mats``: from :meth:`observe_norms` where it handed them all (the index
        into them made once per list of parameters), else measured (a second read of the gradients)."""
        handed, self._grad_norms = self._grad_norms, None
        if handed is not None:
            params, norms = handed
            if self._index is None or self._index[0] is not params or self._index[2].device != norms.device:
                where = {id(p): i for i, p in enumerate(params)}
                found = [where[id(p)] for p in mats if id(p) in where]
                index = torch.tensor(found, device=norms.device) if len(found) == len(mats) else None
                self._index = (params, mats, index) if index is not None else None
            if self._index is not None and _same(self._index[1], mats):
                return norms.index_select(0, self._index[2]).to(device, torch.float64)
        grads = [p.grad for p in mats if p.grad is not None]  # (no walrus: torch.compile refuses it here)
        return torch.stack([n.to(device, torch.float64) for n in torch._foreach_norm(grads)])

    def _set_anchor(self, anchor: Tensor) -> None:
        """[anchor, cap]: the mean of the warm-up norms (NaN until the warm-up ends) and growth × it (inf until then)."""
        a = anchor.detach().to(device=self._state.device, dtype=torch.float64).reshape(())
        self._anchor_cap = torch.stack([a, torch.where(torch.isfinite(a), a * self.growth, math.inf)])

    def _set_first(self, norm: Tensor) -> None:
        """[first norm, cap]: the first finite norm (NaN until seen) and ``first`` × it (inf until then or
        without ``first``)."""
        g = norm.detach().to(device=self._state.device, dtype=torch.float64).reshape(())
        factor = math.inf if self.first is None else self.first
        self._first_cap = torch.stack([g, torch.where(torch.isfinite(g), g * factor, math.inf)])
        self._set_ramp()

    def _set_ramp(self) -> None:
        """The Polyak fraction's factor for each count n of finite norms seen before the step:
        ``√min(1, (n + 1)/warmup)`` with ``ramp`` (1/√warmup on the first step, 1 from the end of
        the warm-up on), else 1; a table indexed by n (on device: made there once, :meth:`_TensorArith.lookup`)."""
        w = self.warmup
        n = torch.arange(w + 1, dtype=torch.float64)
        table = ((n + 1) / w).clamp(max=1.0).sqrt() if self.ramp else torch.ones_like(n)
        self._ramp: tuple[float, ...] = tuple(table.tolist())  # host sync: none, a CPU table

    def _to(self, device: torch.device) -> None:
        super()._to(device)
        self._anchor_cap = self._anchor_cap.to(device)
        self._first_cap = self._first_cap.to(device)

    def _held(self) -> tuple[Tensor, ...]:
        return (self._state, self._anchor_cap, self._first_cap)

    def _hold(self, parts: tuple[Tensor, ...]) -> None:
        self._state, self._anchor_cap, self._first_cap = parts

    def _rule_step(self, r: _Arith, parts: tuple[Any, ...], g: Any) -> tuple[tuple[Any, ...], Any, Any, Any]:
        """ZClip's τ, capped by the growth cap, then by the Polyak cap or (where it is unavailable) the
        first-norm cap; the state is ZClip's, [anchor, growth cap] and [first norm, first-norm cap]."""
        zs, anchor_cap, first_cap = parts
        (zs,), tau, finite, n = super()._rule_step(r, (zs,), g)
        done = finite & (n == self.warmup - 1)  # this finite norm ended the warm-up: μ is the anchor
        anchor_cap = r.where(done, r.scale(r.split(zs)[0], (1.0, self.growth)), anchor_cap)
        tau = r.minimum(tau, anchor_cap[1])
        g = r.scalar(g)  # float64
        fc = first_cap  # from the norms before this one: the first step itself is not capped
        if self.first is not None:
            first_cap = r.where(finite & r.isnan(fc[0]), r.scale(g, (1.0, self.first)), fc)
        cap = self._step_cap(r, g, fc[1], n)
        return (zs, anchor_cap, first_cap), (tau if cap is None else r.minimum(tau, cap)), finite, n

    def _step_cap(self, r: _Arith, g: Any, first_cap: Any, n: Any) -> Any | None:
        """The Polyak cap where it applies (ramped up over the warm-up with ``ramp``: ``n`` finite
        norms seen before this one), else the first-norm cap (inf without ``first``); an Adam-like
        optimizer gets neither (None). Float64 on ``r`` (on device: no host read)."""
        kind, lr = self._step_cap_kind()
        if kind == NO_CAP:
            return None
        if kind == FIRST_CAP or lr is None:
            return first_cap
        cap = self._polyak_cap(r, g, lr)
        if self.ramp:
            cap = cap * r.lookup(self._ramp, n)
        cap = r.where(r.isnan(cap), first_cap, cap)
        trust = self._trust_cap(r, g)
        return cap if trust is None else r.minimum(cap, trust)

    def _kernel_step(self, norm: Tensor) -> _rule_kernel.Step | None:
        """ZClip's, and auto's caps; None (the tensor path) for a tensor learning rate, the trust cap, or a
        loss on another device."""
        step = super()._kernel_step(norm)
        kind, lr = self._step_cap_kind()
        if kind != POLYAK_CAP:
            return None if step is None else step._replace(growth=self.growth, first=self.first, cap=kind)
        if step is None or not isinstance(lr, float) or self.trust is not None:
            return None
        loss = self._loss
        if loss is None or loss.device != norm.device:
            return None
        ramp = self._rule.table_for(self._ramp) if self.ramp else None
        return step._replace(
            growth=self.growth, first=self.first, cap=kind, loss=loss, polyak_over_lr=lr, ramp=ramp
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "growth": self.growth,
            "anchor": self._anchor_cap[0].detach().clone(),
            "first": self.first,
            "first_norm": self._first_cap[0].detach().clone(),
            "polyak": self.polyak,
            "ramp": self.ramp,
            "trust": self.trust,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a saved state (also one saved before ``first``, ``polyak`` or ``ramp`` existed: it had
        none of them)."""
        super().load_state_dict(state)
        self.growth = float(state["growth"])
        self.first = None if state.get("first") is None else float(state["first"])
        self.polyak = None if state.get("polyak") is None else float(state["polyak"])
        self.ramp = bool(state.get("ramp", False))
        self.trust = None if state.get("trust") is None else float(state["trust"])
        self._set_anchor(state["anchor"])
        first_norm = state.get("first_norm")  # absent in states saved before ``first`` existed
        self._set_first(
            first_norm if first_norm is not None else torch.full((), math.nan, dtype=torch.float64)
        )

    def __repr__(self) -> str:
        first = "" if self.first is None else f", first={self.first}"
        polyak = "" if self.polyak is None else f", polyak={self.polyak}"
        ramp = ", ramp=True" if self.ramp else ""
        trust = "" if self.trust is None else f", trust={self.trust}"
        return (
            f"Auto(growth={self.growth}, z_thresh={self.z_thresh}, warmup={self.warmup}"
            f"{first}{polyak}{ramp}{trust})"
        )


def _same(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    """The same tensors (by identity, never by value) in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _longest_step(groups: list[dict[str, Any]], device: torch.device) -> float | Tensor | None:
    """The largest ``lr·(1 − dampening)/(1 − momentum)`` over the groups with parameters: how far aligned
    gradient steps carry the weights per unit of gradient (a float64 tensor on ``device`` where a rate is
    one; None where every rate is 0)."""
    steps = [g["lr"] * _momentum_gain(g) for g in groups if g["params"]]
    if any(isinstance(s, Tensor) for s in steps):
        return torch.stack([torch.as_tensor(s).to(device, torch.float64).reshape(()) for s in steps]).max()
    top = max([float(s) for s in steps]) if steps else 0.0  # (no ``default=``: torch.compile refuses it)
    return top if top > 0 else None


def _momentum_gain(group: dict[str, Any]) -> float:
    """``(1 − dampening)/(1 − momentum)``: the update of aligned gradients in units of one gradient step
    (1 without momentum; a momentum of 1, which never decays, counts as 0.999)."""
    momentum = float(group.get("momentum", 0.0) or 0.0)
    if momentum == 0:
        return 1.0
    return (1.0 - float(group.get("dampening", 0.0))) / max(1.0 - momentum, 1e-3)


def _positive_or_none(value: float | None, name: str, hint: str) -> float | None:
    """``value`` as a finite float > 0, or None."""
    if value is None:
        return None
    v = float(_check_threshold(value, name, allow_inf=False, hint=hint))
    if v <= 0:
        raise GradGuardError(f"{name} must be > 0 or None, got {value!r}. {hint}")
    return v


class HostZClip:
    """ZClip's spike rule on host floats: ``observe(g) -> bool`` flags the spikes of a stream of norms.

    The same rule as :class:`ZClip` (:func:`_zclip_step`, the one implementation): the first
    ``warmup`` finite norms give μ and σ²; then a norm with ``z = (g − μ)/(σ + eps) > z_thresh`` is a
    spike, and μ, σ² follow an EMA of the clipped value ``μ + z_thresh²·σ/z``; non-finite norms
    change nothing. For work off the device: the guard feeds it, at flush, the norms it already
    copied to the host (``on_spike="warn"``), so the spike warning costs no per-step device op.
    """

    def __init__(self, z_thresh: float, alpha: float = 0.97, warmup: int = 25, eps: float = 1e-6) -> None:
        self.alpha, self.z_thresh, self.warmup, self.eps = _zclip_params(alpha, z_thresh, warmup, eps)
        self._rule = _FloatArith(_zclip_rows(self.alpha, self.z_thresh, self.warmup), self.eps, self.z_thresh)
        self._state: tuple[float, ...] = (0.0, 0.0, 0.0)  # μ, σ², finite norms seen (≤ warmup)

    def observe(self, g: float) -> bool:
        """Take the next norm; True when it is a spike (never during the warm-up nor when non-finite)."""
        self._state, _, spike, _, _ = _zclip_step(self._rule, self._state, float(g))
        return bool(spike)

    @property
    def mean(self) -> float:
        """EMA mean of the (clipped) norms."""
        return self._state[0]

    @property
    def var(self) -> float:
        """EMA variance of the (clipped) norms."""
        return self._state[1]

    @property
    def seen(self) -> int:
        """Finite norms seen, up to ``warmup``."""
        return int(self._state[2])

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "host": True,
            "mean": self.mean,
            "var": self.var,
            "seen": self.seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a saved state; a device :class:`ZClip`'s state (no ``"host"`` key) is ignored: start afresh."""
        if not state.get("host"):
            return
        var, seen = max(float(state["var"]), 0.0), min(int(state["seen"]), self.warmup)
        self._state = (float(state["mean"]), var, float(seen))

    def __repr__(self) -> str:
        return f"HostZClip(z_thresh={self.z_thresh}, alpha={self.alpha}, warmup={self.warmup})"


class Value(Clipper):
    """Element-wise value clipping (``"value:1"``).

    Returns the pre-clip max-abs, or ``norm`` unchanged when it is given (then the gradients
    are only read to clamp them). :meth:`clip_` reports the fraction of elements clamped (one
    more read of the gradients, to count them).
    """

    kind = "value"
    usage = "value:CLIP_VALUE (element-wise, e.g. value:1)"

    def __init__(self, clip_value: float) -> None:
        self.clip_value = float(_check_threshold(clip_value, "clip_value"))

    @classmethod
    def from_arg(cls, arg: str | None) -> Value:
        return cls(spec_number(arg))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "clip_value": self.clip_value}

    def zeroes_every_gradient(self) -> bool:
        return _is_zero(self.clip_value)

    def __call__(self, parameters: Tensor | Iterable[Tensor], norm: Tensor | None = None) -> Tensor:
        if norm is None:
            return clip_grad_value_(parameters, self.clip_value)
        _clamp_(grads_of(parameters), self.clip_value)  # the norm was measured: clamp only
        return norm

    def clip_(self, parameters: Tensor | Iterable[Tensor], norm: Tensor | None = None) -> Tensor:
        """Clamp; return the fraction of the gradient elements clamped (``|g| > clip_value``)."""
        grads = grads_of(parameters)
        fraction = _clamped_fraction(grads, self.clip_value)
        _clamp_(grads, self.clip_value)
        return fraction

    def __repr__(self) -> str:
        return f"Value(clip_value={self.clip_value})"


class AGC(Clipper):
    """Adaptive Gradient Clipping as a clipper (``"agc:0.01"``); see :func:`clip_grad_agc_`.

    ``exclude`` takes parameters, or qualified-name prefixes when the clipper is called with
    ``(name, parameter)`` pairs (e.g. ``exclude=["fc"]`` for the final classifier).
    :meth:`clip_` reports the fraction of the (not excluded) units clipped.
    """

    kind = "agc"
    usage = "agc[:LAMBDA] (adaptive gradient clipping, default 0.01)"
    takes_names = True

    def __init__(
        self, clip_factor: float = 0.01, eps: float = 1e-3, exclude: Iterable[Tensor | str] = ()
    ) -> None:
        self.clip_factor = float(
            _check_threshold(clip_factor, "clip_factor", allow_inf=False, hint=_AGC_HINT)
        )
        self.eps = float(_check_threshold(eps, "eps", allow_inf=False, hint=_AGC_EPS_HINT))
        self.exclude = list(exclude)

    @classmethod
    def from_arg(cls, arg: str | None) -> AGC:
        return cls(spec_number(arg, 0.01))

    def config(self) -> dict[str, Any]:
        """The excluded names; excluded tensors are not data and are left out."""
        names = [s for s in self.exclude if isinstance(s, str)]
        return {**super().config(), "clip_factor": self.clip_factor, "eps": self.eps, "exclude": names}

    def zeroes_every_gradient(self) -> bool:
        return _is_zero(self.clip_factor)

    def __call__(self, parameters: Any, norm: Tensor | None = None) -> Tensor:
        params, excluded = self._split(parameters)
        return clip_grad_agc_(params, self.clip_factor, self.eps, exclude=excluded)

    def clip_(self, parameters: Any, norm: Tensor | None = None) -> Tensor:
        """Clip; return the fraction of the units clipped."""
        params, excluded = self._split(parameters)
        unit_norms, clipped = _agc_(params, self.clip_factor, self.eps, excluded)
        return _mean_of(clipped, unit_norms[0].device if unit_norms else None)

    def _split(self, parameters: Any) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters, and those of them that ``exclude`` names or holds."""
        names = [s for s in self.exclude if isinstance(s, str)]
        excluded = [t for t in self.exclude if isinstance(t, Tensor)]
        params: list[Tensor] = []
        for item in _tensors(parameters):
            if isinstance(item, tuple):
                name, p = item
                if any(name == s or name.startswith(s + ".") for s in names):
                    excluded.append(p)
                params.append(p)
            else:
                params.append(item)
        return params, excluded

    def __repr__(self) -> str:
        return f"AGC(clip_factor={self.clip_factor}, eps={self.eps})"


class PerLayer(Clipper):
    """Clip each layer's (or each tensor's) gradient norm to ``max_norm`` separately (``"layer:1"``).

    Called with ``(name, parameter)`` pairs (``model.named_parameters()``), a layer is the module
    that owns the parameters; with plain tensors, each tensor is its own group. Returns the
    pre-clip global norm; :meth:`clip_` reports the fraction of layers clipped.
    """

    kind = "layer"
    usage = "layer:MAX_NORM (per-layer norm clipping)"
    takes_names = True

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = float(_check_threshold(max_norm, "max_norm"))
        self.norm_type = check_norm_type(norm_type)
        self._index: LayerIndex | None = None

    @classmethod
    def from_arg(cls, arg: str | None) -> PerLayer:
        return cls(spec_number(arg))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "max_norm": self.max_norm, "norm_type": self.norm_type}

    def zeroes_every_gradient(self) -> bool:
        return _is_zero(self.max_norm)

    def __call__(self, parameters: Any, norm: Tensor | None = None) -> Tensor:
        scaled = self._scale(parameters)
        return torch.zeros(()) if scaled is None else total_norm(scaled[0], self.norm_type)

    def clip_(self, parameters: Any, norm: Tensor | None = None) -> Tensor:
        """Clip; return the fraction of the layers (with gradients) clipped."""
        scaled = self._scale(parameters)
        return torch.zeros(()) if scaled is None else fraction_clipped(scaled[1])

    def _scale(self, parameters: Any) -> tuple[Tensor, Tensor] | None:
        """Scale each layer's gradients by its coefficient; return (the gradients' norms, the layers'
        coefficients), or None without gradients."""
        items = _tensors(parameters)
        named = bool(items) and isinstance(items[0], tuple)
        names = [n for n, _ in items] if named else [str(i) + ".t" for i in range(len(items))]
        params = [p for _, p in items] if named else items
        if self._index is None or self._index.param_names != names:
            self._index = LayerIndex(names)
        present = [i for i, p in enumerate(params) if p.grad is not None]
        grads = grads_of(params)
        if not grads:
            return None
        norms = tensor_norms(grads, self.norm_type)
        layer_norms = self._index.reduce(norms, self.norm_type, present)
        coefs = coefficient(layer_norms, self.max_norm)
        index = self._index._index(present, coefs.device)
        per_tensor = coefs[index]
        with torch.no_grad():
            for g, c in zip(grads, per_tensor.unbind()):
                g.mul_(c.to(g.dtype))
        return norms, coefs

    def __repr__(self) -> str:
        return f"PerLayer(max_norm={self.max_norm})"


# ----------------------------------------------------------------------------- the registry
CLIPPERS: dict[str, type[Clipper]] = {c.kind: c for c in (Norm, Value, AGC, AutoClip, ZClip, PerLayer, Auto)}
"""Each clipper's class by its kind: what :func:`from_spec` builds. A new clipper is one more line:
``CLIPPERS[MyClipper.kind] = MyClipper``."""


def _accepted() -> str:
    """The accepted spec forms, for error messages."""
    forms = [c.usage or f"{c.kind}[:ARG]" for c in CLIPPERS.values()]
    return "; ".join([*forms, "none (measure only)", "a bare number N (same as norm:N)"])


def from_spec(spec: str | float | dict[str, Any] | Clipper | None) -> Clipper | None:
    """A clipper from a spec string (``"norm:5"``, ``"autoclip:10"``, ``"auto"``, ``"none"``…), a number
    (``norm:N``), a :meth:`Clipper.config` dict, or a clipper (returned as is).

    ``"kind:arg"`` is ``CLIPPERS[kind].from_arg(arg)``; ``"none"`` and None mean no clipper.

    A spec whose threshold is 0 (``"norm:0"``, ``"value:0"``, ``"agc:0"``, ``"layer:0"``, ``0``, or
    such a config) is refused: it would zero every gradient, so the weights would never move. A
    clipper built directly (``Norm(0.0)``) is taken as it is, and the functions keep torch's
    behaviour (``clip_grad_norm_(ps, 0)`` zeroes the gradients, as torch does).

    Raises:
        GradGuardError: an unknown name, a bad number or a zero threshold, with the accepted forms
            or the fix.
    """
    if spec is None or isinstance(spec, Clipper):
        return spec
    clipper = _build(spec)
    if clipper is not None and clipper.zeroes_every_gradient():
        raise GradGuardError(
            f"clip spec {spec!r} zeroes every gradient: a threshold of 0 scales (or clamps) each one to 0, "
            "so the weights never move. Use a positive threshold (`gradguard diagnose` recommends one from "
            f"a run's norms), or 'none' to measure without clipping. Accepted: {_accepted()}."
        )
    return clipper


def _build(spec: str | float | dict[str, Any]) -> Clipper | None:
    """The clipper of a spec (see :func:`from_spec`), before the zero-threshold check."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Norm(float(spec))
    if isinstance(spec, dict):
        return _from_config(spec)
    if not isinstance(spec, str):
        raise GradGuardError(
            f"clip must be a spec string, a number or a gradguard.clip.Clipper, got {spec!r}."
        )
    name, _, arg = spec.strip().lower().partition(":")
    if not arg and _is_number(name):  # a bare number ("5", as a command line passes it): norm clipping
        return Norm(float(name))
    if name == "none" and not arg:
        return None
    cls = CLIPPERS.get(name)
    try:
        if cls is None:
            raise SpecArgError()
        return cls.from_arg(arg or None)
    except SpecArgError as e:
        if e.reason is None:
            raise GradGuardError(f"unknown clip spec {spec!r}. Accepted: {_accepted()}.") from None
        raise GradGuardError(f"clip spec {spec!r}: {e.reason}. Accepted: {_accepted()}.") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _from_config(config: dict[str, Any]) -> Clipper:
    """The clipper a :meth:`Clipper.config` dict describes."""
    cls = CLIPPERS.get(config.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise GradGuardError(
            f"clip config {config!r}: unknown kind {config.get('kind')!r}. Known: {', '.join(CLIPPERS)}."
        )
    return cls.from_config(config)
