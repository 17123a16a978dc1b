"""Gradient clipping: norm, value, AGC, per-layer, AutoClip, ZClip and ``auto`` — sync-free.

Functions clip in place and return the pre-clip statistic as a device tensor, like
:func:`torch.nn.utils.clip_grad_norm_`. Stateful clippers are callables
``clipper(parameters, norm=None) -> pre-clip norm`` with ``state_dict`` / ``load_state_dict``;
pass ``norm`` when it was already measured, so the gradients are read only once more (to scale).

What gradguard does differently from torch, on purpose:

* A non-finite norm leaves the gradients untouched (coefficient 1): torch multiplies by
  ``τ/inf = 0`` or by NaN, zeroing every finite gradient or turning it into NaN. Detect the
  non-finite step from the returned norm (or let :class:`gradguard.Guard` skip it).
* float16/bfloat16 norms accumulate in float32 (a float16 norm above 65504 is measured, not
  ``inf``), and the total accumulates in float64 (see :mod:`gradguard.stats`).
* A tensor ``max_norm`` is never read on the host.
* Adaptive clippers update their state with finite norms only: one NaN step never poisons them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradguard.errors import GradGuardError, NonFiniteError
from gradguard.stats import (
    _FOREACH_DEVICES,
    LayerIndex,
    as_tensor_list,
    check_norm_type,
    check_tensors,
    grads_of,
    tensor_norms,
    total_norm,
)

__all__ = [
    "AGC",
    "Auto",
    "AutoClip",
    "Clipper",
    "Norm",
    "NormClipper",
    "PerLayer",
    "Value",
    "ZClip",
    "clip_grad_agc_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "coefficient",
    "from_spec",
    "scale_",
]

_STATE_VERSION = 1


# ----------------------------------------------------------------------------- shared pieces
def _check_threshold(value: float | Tensor, name: str, *, allow_inf: bool = True) -> float | Tensor:
    """A float threshold must be a number ≥ 0; a tensor one is left on device (not validated: that would sync)."""
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
            f"{name} must be a finite number ≥ 0, got {value!r}. Pick one from the observed gradient norms "
            "(`gradguard diagnose` recommends one), e.g. 1.0."
        )
    return v


def coefficient(norm: Tensor, threshold: float | Tensor) -> Tensor:
    """The norm-clipping coefficient ``min(1, τ / (‖g‖ + 1e-6))`` as a float32 device tensor.

    1 (leave the gradients alone) where the norm or the threshold is non-finite, and clamped at 0
    for a negative tensor threshold, so the coefficient itself never zeroes finite gradients by
    accident nor writes NaN. No host sync.
    """
    n = norm.to(torch.float32) if norm.dtype != torch.float64 else norm
    tau: float | Tensor = threshold
    if isinstance(threshold, Tensor):
        tau = threshold.to(device=n.device, dtype=n.dtype)
        if tau.numel() == 1:  # a (1,)-shaped max_norm scales like a scalar (foreach needs 0-D)
            tau = tau.reshape(())
    coef = (tau / (n + 1e-6)).clamp(0.0, 1.0)
    # 1 where the norm or the coefficient is not finite: n·coef·0 is 0 exactly when both are finite
    # (7 small ops instead of 15: isfinite is 4 ops on CPU, and each costs ~5 µs of dispatch)
    return torch.where(n * coef * 0 == 0, coef, 1.0)


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
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float | Tensor,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Clip the global gradient norm in place: ``g ← τ·g/‖g‖`` when ``‖g‖ ≥ τ`` (Pascanu et al. 2013).

    A drop-in for :func:`torch.nn.utils.clip_grad_norm_` (same result to float tolerance wherever
    torch's is finite) that is overflow-safe for float16 and never zeroes or NaN-fills finite
    gradients when the norm is non-finite (it leaves them untouched and returns the non-finite
    norm). ``max_norm`` may be a device tensor; it is never read on the host.

    Args:
        parameters: tensors (or one tensor) whose ``.grad`` is clipped.
        max_norm: the threshold τ ≥ 0 (float or 1-element tensor).
        norm_type: p > 0 or ``inf``.
        error_if_nonfinite: raise :class:`gradguard.NonFiniteError` on a non-finite norm. This
            reads the norm on the host (one sync), as torch does.
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
    grads = grads_of(parameters)
    total = total_norm(tensor_norms(grads, p, foreach=foreach), p)
    if error_if_nonfinite and not bool(torch.isfinite(total)):  # host sync: opt-in, as in torch
        raise NonFiniteError(
            f"the total norm of order {p} of the gradients is {float(total)}; the gradients cannot be clipped. "
            "Pass error_if_nonfinite=False to leave them untouched (gradguard never zeroes them), or find the "
            "first non-finite value with `gradguard.locate`."
        )
    if grads:
        scale_(grads, coefficient(total, threshold), foreach=foreach)
    return total


def clip_grad_value_(
    parameters: Tensor | Iterable[Tensor], clip_value: float, foreach: bool | None = None
) -> Tensor:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` in place.

    Returns the pre-clip max-abs of the gradients, so an overflow is still visible: value
    clipping maps ±inf to ±clip_value and lets NaN through, hiding what went wrong.
    """
    v = float(_check_threshold(clip_value, "clip_value"))
    grads = grads_of(parameters)
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
    lam = float(_check_threshold(clip_factor, "clip_factor", allow_inf=False))
    e = float(_check_threshold(eps, "eps", allow_inf=False))
    skip = {id(t) for t in exclude}
    # per (gradient dtype, weight dtype): gradients and weights of the rank ≥ 2 tensors, then of the others
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
    check_tensors([g for lists in groups.values() for g in lists[0] + lists[2]] + others, what="gradient")
    unit_norms: list[Tensor] = []
    with torch.no_grad():
        for (g_dtype, w_dtype), (g_mats, w_mats, g_vecs, w_vecs) in groups.items():
            foreach = (g_mats + g_vecs)[0].device.type in _FOREACH_DEVICES
            gn = _unit_norms(g_mats, g_vecs, _acc(g_dtype), foreach)
            max_n = _unit_norms(w_mats, w_vecs, _acc(w_dtype), foreach).clamp_min(e).mul_(lam)
            # a unit with a non-finite gradient norm is left untouched (λ‖W‖*/inf = 0 would zero it)
            gf = gn.nan_to_num(nan=0.0, posinf=0.0)
            coef = torch.where(gf > max_n, max_n / gf.clamp_min(1e-6), 1.0)
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
        if others:
            unit_norms.append(tensor_norms(others))
    if not unit_norms:
        return torch.zeros(())
    # the global norm is the norm of the unit norms (each tensor's norm is the norm of its units')
    allnorms = unit_norms[0] if len(unit_norms) == 1 else torch.cat(unit_norms)
    return torch.linalg.vector_norm(allnorms, dtype=torch.float64).to(torch.float32)


# ----------------------------------------------------------------------------- stateful clippers
class Clipper:
    """Base class: ``clipper(parameters, norm=None) -> pre-clip global norm``, with state.

    Subclasses that only need a threshold from the global norm derive from :class:`NormClipper`.
    """

    norm_type: float = 2.0

    def __call__(self, parameters: Tensor | Iterable[Tensor], norm: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Tensors and Python scalars only (``torch.load(weights_only=True)`` loads it)."""
        return {"version": _STATE_VERSION}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get("version")
        if version != _STATE_VERSION:
            raise GradGuardError(
                f"{type(self).__name__} state has version {version!r}; this gradguard reads version "
                f"{_STATE_VERSION}. Save it again with this version or start the clipper fresh."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NormClipper(Clipper):
    """Global-norm clipping with a threshold chosen per step by :meth:`threshold`.

    The :class:`gradguard.Guard` calls :meth:`threshold` with the norm it measured and folds the
    coefficient into the optimizer step; calling the clipper does the same on its own.
    """

    def threshold(self, norm: Tensor) -> Tensor:
        """Observe this step's global norm (finite values only) and return τ for this step."""
        raise NotImplementedError

    def __call__(self, parameters: Tensor | Iterable[Tensor], norm: Tensor | None = None) -> Tensor:
        grads = grads_of(parameters)
        if norm is None:
            norm = total_norm(tensor_norms(grads, self.norm_type), self.norm_type)
        tau = self.threshold(norm)
        if grads:
            scale_(grads, coefficient(norm, tau))
        return norm


class Norm(NormClipper):
    """Fixed-threshold global-norm clipping (``"norm:5"``); ``max_norm`` may be a device tensor."""

    def __init__(self, max_norm: float | Tensor, norm_type: float = 2.0) -> None:
        self.max_norm = _check_threshold(max_norm, "max_norm")
        self.norm_type = check_norm_type(norm_type)

    def threshold(self, norm: Tensor) -> Tensor:
        if isinstance(self.max_norm, Tensor):
            return self.max_norm.to(device=norm.device, dtype=torch.float32).reshape(())
        return torch.full((), self.max_norm, dtype=torch.float32, device=norm.device)

    def __repr__(self) -> str:
        return f"Norm(max_norm={self.max_norm})"


class AutoClip(NormClipper):
    """AutoClip (Seetharaman, Wichern, Pardo, Le Roux, MLSP 2020): τ_t = p-th percentile of past norms.

    The history (current norm included) lives in a fixed window of the last ``window`` finite
    norms on device; the percentile is numpy's/torch's linear interpolation over them. A
    non-finite step changes nothing (no slot, no count), so it never enters the percentile. The paper
    recommends p = 10 (it clips ~90% of steps by design: judge it by progress, not clip rate).

    Per step: one write into the ring buffer, one partial sort (``topk`` of the few smallest
    values the percentile can need), and a table lookup of the two ranks and the interpolation
    weight for the number of norms in the window (the same float32 ranks as
    :func:`torch.nanquantile`), all on device.
    """

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
        self._count = torch.zeros((), dtype=torch.long)  # finite norms seen, on device
        self._set_history(torch.full((window,), math.nan, dtype=torch.float32))

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
        self._topk_out = (self._vals[:k], torch.empty(k, dtype=torch.long, device=device))
        # the two values and the weight picked for this step, and 0-D views of them for the lerp
        self._picked = torch.empty(1, 3, dtype=torch.float32, device=device)
        self._lerp_args = self._picked[0].unbind()
        self._spare = torch.tensor(w, device=device)
        self._count = self._count.to(device)

    def _to(self, device: torch.device) -> None:
        self._set_history(self._window_view.to(device))

    def threshold(self, norm: Tensor) -> Tensor:
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

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "percentile": self.percentile,
            "window": self.window,
            "history": self._window_view.detach().clone(),
            "count": self._count.detach().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.percentile = float(state["percentile"])
        self.window = int(state["window"])
        history = state["history"].detach()
        self._count = torch.as_tensor(state["count"], dtype=torch.long).detach().clone().reshape(())
        self._set_history(history)

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile}, window={self.window})"


class ZClip(NormClipper):
    """ZClip (Kumar, Owen, Roy Chowdhury, Güra 2025): z-score spike clipping with EMA statistics.

    The first ``warmup`` finite norms give μ and σ² (no clipping meanwhile). After that, with
    ``z = (g − μ)/(σ + eps)``: if ``z > z_thresh`` the threshold is ``τ = μ + z_thresh²·σ/z``
    (bigger spikes are clipped harder), and μ, σ² follow an EMA (``alpha``) of the *clipped*
    value: ``μ ← αμ + (1−α)g'``, ``σ² ← ασ² + (1−α)(g' − μ)²``. Non-finite norms change nothing.
    ``max_norm`` optionally caps τ (the PyPI package caps at 1.0 by default; here off).

    Both phases are one update ``[μ, σ², n] ← A·[μ, σ², n] + B·[Δ, Δ², 1]`` with ``Δ = g' − μ``,
    whose coefficients A, B (and the z threshold, inf during the warm-up) are looked up on
    device by the count n of finite norms seen: about 20 small ops per step, no host sync.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup: int = 25,
        eps: float = 1e-6,
        max_norm: float | None = None,
    ) -> None:
        if not 0.0 < float(alpha) < 1.0:
            raise GradGuardError(f"alpha must be in (0, 1), got {alpha!r}. The paper uses 0.97.")
        self.z_thresh = float(_check_threshold(z_thresh, "z_thresh", allow_inf=False))
        if self.z_thresh <= 0:
            raise GradGuardError(f"z_thresh must be > 0, got {z_thresh!r}. The paper uses 2.5.")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise GradGuardError(f"warmup must be a positive int, got {warmup!r}. The paper uses 25.")
        self.alpha = float(alpha)
        self.warmup = warmup
        self.eps = float(_check_threshold(eps, "eps", allow_inf=False))
        self.max_norm = None if max_norm is None else float(_check_threshold(max_norm, "max_norm"))
        # μ, σ² (population variance of the warm-up norms, then the EMA) and the number of finite
        # norms seen (it stops at warmup); float64 on the norm's device.
        self._set_state(torch.zeros(3, dtype=torch.float64))

    def _set_state(self, stats: Tensor) -> None:
        """Take ``stats`` ([μ, σ², n]) as the state and build the update table on its device."""
        self._state = stats.detach().to(torch.float64).reshape(1, 3)
        rows = []
        for n in range(self.warmup):  # Welford, k = 1/(n+1): μ + kΔ, (1−k)σ² + k(1−k)Δ², n + 1
            k = 1.0 / (n + 1)
            rows.append([[math.inf] * 3, [1.0, 1.0 - k, 1.0], [k, k * (1.0 - k), 1.0]])
        # EMA of the clipped value g' = μ + Δ: αμ + (1−α)g' = μ + (1−α)Δ and, since g' − μ_new = αΔ,
        # ασ² + (1−α)(g' − μ_new)² = ασ² + (1−α)α²Δ²; n stays at warmup
        a = self.alpha
        rows.append([[self.z_thresh] * 3, [1.0, a, 1.0], [1.0 - a, (1.0 - a) * a * a, 0.0]])
        # per n: the z threshold (inf: no clipping during the warm-up), A, B
        device = self._state.device
        self._table = torch.tensor(rows, dtype=torch.float64).to(device)
        # Δ ** powers = [Δ, Δ², 1]; eps; z_thresh²
        self._consts = torch.tensor(
            [1.0, 2.0, 0.0, self.eps, self.z_thresh**2, math.inf], dtype=torch.float64
        )
        self._consts = self._consts.to(device)
        self._powers, self._eps_t, self._zt2, self._inf = self._consts.split((3, 1, 1, 1))

    def _to(self, device: torch.device) -> None:
        self._set_state(self._state.to(device))

    def _observe(self, norm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Update the state with a finite ``norm``; return (τ, float64, shape (1, 3) with 3 equal
        values; the finite flag; the count n before the update, shape (1,))."""
        s = self._state  # (1, 3)
        if s.device != norm.device:
            self._to(norm.device)
            s = self._state
        mean, var, n = s.unbind(1)  # (1,) each; var ≥ 0
        n = n.long()  # ≤ warmup
        zt, a, b = self._table.index_select(0, n).unbind(1)  # (1, 3) each
        d = (norm.detach() if norm.requires_grad else norm) - mean
        d = d + d * 0.0  # ±inf → NaN: a non-finite norm gives no spike and leaves the state as it is
        finite = self._inf > d
        std = var.sqrt()
        z = d / (std + self._eps_t)
        spike = z > zt  # never during the warm-up (zt = inf) nor for a non-finite norm
        off = self._zt2 * std / z  # τ − μ on a spike
        delta = torch.where(spike, off, d)  # g' − μ, three times
        self._state = torch.where(finite, torch.addcmul(a * s, b, delta.pow(self._powers)), s)
        return torch.where(spike, mean + off, self._inf), finite, n

    def threshold(self, norm: Tensor) -> Tensor:
        tau = self._observe(norm)[0]
        if self.max_norm is not None:
            tau = tau.clamp_max(self.max_norm)
        return tau[0, 0].to(torch.float32)

    @property
    def mean(self) -> Tensor:
        """EMA mean of the (clipped) norms, on device."""
        return self._state[0, 0].clone()

    @property
    def std(self) -> Tensor:
        """EMA standard deviation of the (clipped) norms, on device."""
        return self._state[0, 1].sqrt()

    def state_dict(self) -> dict[str, Any]:
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
        stats[1:].clamp_min_(0.0)  # a variance ≥ 0 (the update keeps it so)
        stats[2:].clamp_max_(self.warmup)  # the count indexes the update table (no host read)
        self._set_state(stats)

    def __repr__(self) -> str:
        return f"ZClip(alpha={self.alpha}, z_thresh={self.z_thresh}, warmup={self.warmup}, max_norm={self.max_norm})"


class Auto(ZClip):
    """The ``"auto"`` clipper: ZClip's spike clipping, capped by the healthy scale of the norms.

    A z-score rule alone clips only outliers and keeps training un-stalled, but a slow, steady
    growth of the norm (an explosion over many steps) moves the EMA with it. ``auto`` therefore
    also caps τ at ``growth`` × the mean of the warm-up norms (the healthy scale), so gradients
    that grow by orders of magnitude are held at the scale where training was healthy; it never
    clips the healthy steps themselves (τ ≥ that scale).

    That cap only exists once the warm-up is over, and an explosion can be under way by then:
    a run that blows up within its first steps (an LSTM language model at SGD lr = 1 goes from a
    norm of 10 to inf in 10 steps) fills the warm-up with the explosion itself. ``first`` adds a
    cap that exists from the second step on: τ ≤ ``first`` × the first finite norm — the only
    norm measured before any update could have started an explosion. Pascanu, Mikolov & Bengio
    (ICML 2013) found thresholds of 0.5–10× the average norm to converge; ``first=0.5`` is the
    lower end, with the first norm standing in for the average. The ``"auto"`` spec uses
    ``first=0.5``; ``Auto()`` alone keeps the warm-up-only rule.

    Measured (``gradguard demo``, seeds 0-2; see :mod:`gradguard.demos`): with ``first=0.5`` the
    LSTM at lr = 1 trains for its 500 steps (no non-finite step, 2.85-2.98 bits/char on held-out
    text against a unigram 4.79) where ``Auto()`` goes non-finite at step 10-11, and Deep SAD
    clips 2-12 % of its steps with no non-finite step and a loss of 0.008-0.010 (seeds 0-7: 2-12 %)
    where ``Auto()`` goes non-finite (seeds 0, 1) or diverges to a loss of ~1e4 (seed 2). A run
    whose healthy norms rise far above the first one (e.g. adapters initialised at zero) is then
    clipped on most steps: pass a fixed threshold instead
    (``gradguard diagnose`` recommends one).

    Args:
        growth: the cap after the warm-up, in units of the warm-up mean (≥ 1).
        first: the cap from the second step on, in units of the first finite norm (> 0), or
            ``None`` for no such cap.
        **zclip: :class:`ZClip`'s ``alpha``, ``z_thresh``, ``warmup``, ``eps``, ``max_norm``.
    """

    def __init__(self, growth: float = 10.0, first: float | None = None, **zclip: Any) -> None:
        super().__init__(**zclip)
        self.growth = float(_check_threshold(growth, "growth", allow_inf=False))
        if self.growth < 1:
            raise GradGuardError(f"growth must be ≥ 1, got {growth!r}. The default is 10.")
        if first is not None:
            first = float(_check_threshold(first, "first", allow_inf=False))
            if first <= 0:
                raise GradGuardError(f'first must be > 0 or None, got {first!r}. The "auto" spec uses 0.5.')
        self.first = first
        self._set_anchor(torch.full((), math.nan, dtype=torch.float64))
        self._set_first(torch.full((), math.nan, dtype=torch.float64))

    def _set_anchor(self, anchor: Tensor) -> None:
        """[anchor, cap]: the mean of the warm-up norms (NaN until the warm-up ends) and growth × it (inf until then)."""
        a = anchor.detach().to(device=self._state.device, dtype=torch.float64).reshape(())
        self._anchor_cap = torch.stack([a, torch.where(torch.isfinite(a), a * self.growth, math.inf)])
        self._times = torch.tensor([1.0, self.growth], dtype=torch.float64).to(self._state.device)

    def _set_first(self, norm: Tensor) -> None:
        """[first norm, cap]: the first finite norm (NaN until seen) and ``first`` × it (inf until then or
        without ``first``)."""
        g = norm.detach().to(device=self._state.device, dtype=torch.float64).reshape(())
        factor = math.inf if self.first is None else self.first
        self._first_cap = torch.stack([g, torch.where(torch.isfinite(g), g * factor, math.inf)])
        self._first_times = torch.tensor([1.0, factor], dtype=torch.float64).to(self._state.device)

    def _to(self, device: torch.device) -> None:
        super()._to(device)
        self._anchor_cap = self._anchor_cap.to(device)
        self._times = self._times.to(device)
        self._first_cap = self._first_cap.to(device)
        self._first_times = self._first_times.to(device)

    def _observe(self, norm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        tau, finite, n = super()._observe(norm)
        done = finite & (n == self.warmup - 1)  # this finite norm ended the warm-up: μ is the anchor
        self._anchor_cap = ac = torch.where(done, self._state[0, 0] * self._times, self._anchor_cap)
        tau = torch.minimum(tau, ac[1])
        if self.first is None:
            return tau, finite, n
        fc = self._first_cap  # from the norms before this one: the first step itself is not capped
        g = (norm.detach() if norm.requires_grad else norm).to(torch.float64).reshape(())
        self._first_cap = torch.where(finite & torch.isnan(fc[0]), g * self._first_times, fc)
        return torch.minimum(tau, fc[1]), finite, n

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "growth": self.growth,
            "anchor": self._anchor_cap[0].detach().clone(),
            "first": self.first,
            "first_norm": self._first_cap[0].detach().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.growth = float(state["growth"])
        self.first = None if state.get("first") is None else float(state["first"])
        self._set_anchor(state["anchor"])
        first_norm = state.get("first_norm")  # absent in states saved before ``first`` existed
        self._set_first(
            first_norm if first_norm is not None else torch.full((), math.nan, dtype=torch.float64)
        )

    def __repr__(self) -> str:
        first = "" if self.first is None else f", first={self.first}"
        return f"Auto(growth={self.growth}, z_thresh={self.z_thresh}, warmup={self.warmup}{first})"


class Value(Clipper):
    """Element-wise value clipping (``"value:1"``).

    Returns the pre-clip max-abs, or ``norm`` unchanged when it is given (then the gradients
    are only read to clamp them).
    """

    def __init__(self, clip_value: float) -> None:
        self.clip_value = float(_check_threshold(clip_value, "clip_value"))

    def __call__(self, parameters: Tensor | Iterable[Tensor], norm: Tensor | None = None) -> Tensor:
        if norm is None:
            return clip_grad_value_(parameters, self.clip_value)
        _clamp_(grads_of(parameters), self.clip_value)  # the norm was measured: clamp only
        return norm

    def __repr__(self) -> str:
        return f"Value(clip_value={self.clip_value})"


class AGC(Clipper):
    """Adaptive Gradient Clipping as a clipper (``"agc:0.01"``); see :func:`clip_grad_agc_`.

    ``exclude`` takes parameters, or qualified-name prefixes when the clipper is called with
    ``(name, parameter)`` pairs (e.g. ``exclude=["fc"]`` for the final classifier).
    """

    def __init__(
        self, clip_factor: float = 0.01, eps: float = 1e-3, exclude: Iterable[Tensor | str] = ()
    ) -> None:
        self.clip_factor = float(_check_threshold(clip_factor, "clip_factor", allow_inf=False))
        self.eps = float(_check_threshold(eps, "eps", allow_inf=False))
        self.exclude = list(exclude)

    def __call__(self, parameters: Any, norm: Tensor | None = None) -> Tensor:
        items = as_tensor_list(parameters) if isinstance(parameters, Tensor) else list(parameters)
        names = [s for s in self.exclude if isinstance(s, str)]
        excluded = [t for t in self.exclude if isinstance(t, Tensor)]
        params: list[Tensor] = []
        for item in items:
            if isinstance(item, tuple):
                name, p = item
                if any(name == s or name.startswith(s + ".") for s in names):
                    excluded.append(p)
                params.append(p)
            else:
                params.append(item)
        return clip_grad_agc_(params, self.clip_factor, self.eps, exclude=excluded)

    def __repr__(self) -> str:
        return f"AGC(clip_factor={self.clip_factor}, eps={self.eps})"


class PerLayer(Clipper):
    """Clip each layer's (or each tensor's) gradient norm to ``max_norm`` separately (``"layer:1"``).

    Called with ``(name, parameter)`` pairs (``model.named_parameters()``), a layer is the module
    that owns the parameters; with plain tensors, each tensor is its own group. Returns the
    pre-clip global norm.
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = float(_check_threshold(max_norm, "max_norm"))
        self.norm_type = check_norm_type(norm_type)
        self._index: LayerIndex | None = None

    def __call__(self, parameters: Any, norm: Tensor | None = None) -> Tensor:
        items = as_tensor_list(parameters) if isinstance(parameters, Tensor) else list(parameters)
        named = bool(items) and isinstance(items[0], tuple)
        names = [n for n, _ in items] if named else [str(i) + ".t" for i in range(len(items))]
        params = [p for _, p in items] if named else items
        if self._index is None or self._index.param_names != names:
            self._index = LayerIndex(names)
        present = [i for i, p in enumerate(params) if p.grad is not None]
        grads = grads_of(params)
        if not grads:
            return torch.zeros(())
        norms = tensor_norms(grads, self.norm_type)
        layer_norms = self._index.reduce(norms, self.norm_type, present)
        coefs = coefficient(layer_norms, self.max_norm)
        index = self._index._index(present, coefs.device)
        per_tensor = coefs[index]
        with torch.no_grad():
            for g, c in zip(grads, per_tensor.unbind()):
                g.mul_(c.to(g.dtype))
        return total_norm(norms, self.norm_type)

    def __repr__(self) -> str:
        return f"PerLayer(max_norm={self.max_norm})"


_SPECS = {
    "norm": "norm:MAX_NORM (global norm clipping, e.g. norm:5)",
    "value": "value:CLIP_VALUE (element-wise, e.g. value:1)",
    "agc": "agc[:LAMBDA] (adaptive gradient clipping, default 0.01)",
    "autoclip": "autoclip[:PERCENTILE] (default 10)",
    "zclip": "zclip[:Z_THRESH] (default 2.5)",
    "layer": "layer:MAX_NORM (per-layer norm clipping)",
    "auto": "auto (ZClip spike clipping, capped at half the first norm and 10x the warm-up norm)",
    "none": "none (measure only)",
    "number": "a bare number N (same as norm:N)",
}


def from_spec(spec: str | Clipper | None) -> Clipper | None:
    """A clipper from a spec string (``"norm:5"``, ``"autoclip:10"``, ``"auto"``, ``"none"``…) or as is.

    Raises:
        GradGuardError: an unknown name or a bad number, listing the accepted forms.
    """
    if spec is None or isinstance(spec, Clipper):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Norm(float(spec))
    if not isinstance(spec, str):
        raise GradGuardError(
            f"clip must be a spec string, a number or a gradguard.clip.Clipper, got {spec!r}."
        )
    name, _, arg = spec.strip().lower().partition(":")
    allowed = "; ".join(_SPECS.values())
    if not arg:  # a bare number ("5", as a command line passes it): global norm clipping
        try:
            number: float | None = float(name)
        except ValueError:
            number = None
        if number is not None:
            return Norm(number)
    try:
        num = float(arg) if arg else None
    except ValueError:
        raise GradGuardError(f"clip spec {spec!r}: {arg!r} is not a number. Accepted: {allowed}.") from None
    if name == "none" and num is None:
        return None
    if name == "auto" and num is None:
        return Auto(first=0.5)
    if name == "norm" and num is not None:
        return Norm(num)
    if name == "value" and num is not None:
        return Value(num)
    if name == "layer" and num is not None:
        return PerLayer(num)
    if name == "agc":
        return AGC(0.01 if num is None else num)
    if name == "autoclip":
        return AutoClip(10.0 if num is None else num)
    if name == "zclip":
        return ZClip(z_thresh=2.5 if num is None else num)
    raise GradGuardError(f"unknown clip spec {spec!r}. Accepted: {allowed}.")
