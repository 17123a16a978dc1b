"""Statistics about a step's gradients, weights and updates — device tensors only, no host sync.

Everything here returns tensors on the gradients' device and never reads a value on the host,
so a training step on a GPU never waits for these numbers. The gradients are read **once**:
per-tensor norms come from one foreach pass, and the global norm, the per-layer norms and the
non-finite flags are all derived from that small vector of norms.

Numerics:

* Norms accumulate in float32 for float16/bfloat16 gradients (float64 stays float64), so a
  float16 gradient whose norm is above 65504 is measured exactly instead of becoming ``inf``.
* The global and per-layer norms are the norms of the per-tensor norms, accumulated in float64,
  so many large but finite tensors never overflow the total.
* A single float32/bfloat16 tensor whose squares exceed float32's range (elements of about
  ``1.8e19`` and up) measures ``inf`` in the default one-pass path: telling it apart from a real
  ``inf`` needs a second read of that tensor. :func:`exact_norms` does that read (scaled by the
  max-abs, overflow-free); :class:`gradguard.Guard` calls it only on the steps whose norm came
  out non-finite, so healthy steps never pay for it.
* ``tensor_norms(..., wide=True)`` accumulates every dtype in float64 instead, in the same one
  read: such a tensor is measured exactly (finite), and only a real ``inf`` (or a norm beyond
  float32's ``3.4e38`` itself) is ``inf``. The functions of :mod:`gradguard.clip`
  (``clip_grad_norm_``, ``get_total_norm``) measure so. The cost is float64 arithmetic: on CUDA
  for p = 1 and 2 it happens inside the foreach kernel (no extra memory traffic); on the CPU,
  and for other p, each tensor is converted to float64 as it is measured (a transient copy of
  one tensor at a time; on the CPU the norm takes several times as long as a float32 one).

Example:
    >>> import torch, gradguard.stats as S
    >>> model = torch.nn.Linear(3, 2)
    >>> model(torch.ones(4, 3)).sum().backward()
    >>> g = S.grad_stats(model.parameters())
    >>> bool(torch.isclose(g.total, torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradguard.errors import GradGuardError

__all__ = [
    "GradStats",
    "LayerIndex",
    "as_tensor_list",
    "check_norm_type",
    "exact_norms",
    "grad_stats",
    "grads_of",
    "layer_name",
    "tensor_norms",
    "total_norm",
    "uniform_norms",
    "update_ratios",
]

_FOREACH_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps", "meta"})


def as_tensor_list(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    """A list from a tensor, a list of tensors or a generator (consumed once)."""
    if isinstance(parameters, Tensor):
        return [parameters]
    return list(parameters)


def grads_of(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    """The ``.grad`` of each parameter that has one, checked for what gradguard can measure.

    Raises:
        GradGuardError: a sparse gradient, or gradients on more than one device.
    """
    grads = [p.grad for p in as_tensor_list(parameters) if p.grad is not None]
    check_tensors(grads, what="gradient")
    return grads


def check_tensors(tensors: Sequence[Tensor], what: str = "tensor") -> None:
    """Refuse sparse, complex or integer tensors and tensors spread over several devices, with a
    fix in the message (host metadata only: no device value is read)."""
    devices = set()
    for t in tensors:
        if t.layout != torch.strided:
            raise GradGuardError(
                f"gradguard got a {t.layout} {what} of shape {tuple(t.shape)}; it measures dense "
                f"{what}s here (a Guard reads the sparse gradients of its model's nn.Embedding / "
                "nn.EmbeddingBag(sparse=True) modules). Make it dense with `.to_dense()`, or use dense "
                "embeddings (`nn.Embedding(..., sparse=False)`)."
            )
        if not t.is_floating_point():
            raise GradGuardError(_not_real(t, what))
        devices.add(t.device)
    if len(devices) > 1:
        raise GradGuardError(
            f"gradguard got {what}s on several devices {sorted(map(str, devices))}; one call measures one "
            "device. Call it once per device group (e.g. per pipeline stage), or move the model to one device."
        )


def _not_real(t: Tensor, what: str) -> str:
    """The message for a complex or integer tensor."""
    shape, dtype = tuple(t.shape), t.dtype
    if t.is_complex():
        return (
            f"gradguard got a complex {what} of shape {shape} and dtype {dtype}; it measures real "
            f"floating-point {what}s only. Keep the parameter real (store `torch.view_as_real(w)` and "
            "use `torch.view_as_complex` in forward), or leave it out of what gradguard guards and "
            "clip it with torch.nn.utils.clip_grad_norm_."
        )
    return (
        f"gradguard got a {what} of shape {shape} and dtype {dtype}; it measures floating-point "
        f"{what}s only. Convert it with `.float()`, or leave it out."
    )


def check_norm_type(norm_type: float | int | str) -> float:
    """``norm_type`` as a float: any p > 0, or ``inf``. Raises a clear error otherwise."""
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise GradGuardError(
            f"norm_type must be a number > 0 or 'inf', got {norm_type!r}. Use 2.0 (the default) or float('inf')."
        ) from None
    if math.isnan(p) or p <= 0:
        raise GradGuardError(
            f"norm_type must be > 0 (or inf), got {norm_type!r}. Use 2.0 (the default), 1.0 or float('inf')."
        )
    return p


def _acc_dtype(dtype: torch.dtype, wide: bool = False) -> torch.dtype:
    """The dtype a norm of ``dtype`` accumulates in: float32 (float64 for float64, or ``wide``)."""
    return torch.float64 if wide or dtype == torch.float64 else torch.float32


def _groups(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """The indices of ``tensors`` by (device, dtype) (one group, the usual case, found with a
    cheaper loop than the dict's)."""
    device, dtype = tensors[0].device, tensors[0].dtype
    if all(t.dtype is dtype and t.device == device for t in tensors):
        return {(device, dtype): list(range(len(tensors)))}
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def tensor_norms(
    tensors: Sequence[Tensor], norm_type: float = 2.0, *, foreach: bool | None = None, wide: bool = False
) -> Tensor:
    """The p-norm of each tensor, as one 1-D tensor in input order (one read of each tensor).

    Float16/bfloat16 inputs are accumulated in float32; the result is float32, or float64 when
    any input is float64. Empty input gives an empty float32 CPU tensor; a tensor with no
    elements has norm 0 (for ``inf`` too, where torch raises).

    Args:
        tensors: tensors on one device (any mix of floating dtypes).
        norm_type: p > 0 or ``inf``.
        foreach: use the foreach kernels (default: where the device supports them).
        wide: accumulate in float64 (p < inf): a float32/bfloat16 tensor whose squares overflow
            float32 is measured, not ``inf`` (see the module's numerics). The result's dtype is
            the same.

    Raises:
        GradGuardError: tensors on more than one device.
    """
    p = check_norm_type(norm_type)
    if not tensors:
        return torch.zeros(0)
    groups = _groups(tensors)
    if len(groups) == 1 and not math.isinf(p):  # one device and dtype (the usual case): one call
        ((device, dtype),) = groups
        ts = tensors if isinstance(tensors, (list, tuple)) else list(tensors)
        return _as(_group_norms(ts, device, dtype, p, foreach, wide), _out_dtype(groups))
    if len({device for device, _ in groups}) > 1:
        check_tensors(tensors)  # raises a GradGuardError naming the devices
    out_dtype = _out_dtype(groups)
    found: dict[int, Tensor] = {}
    for (device, dtype), idx in groups.items():
        # the inf norm (a max) of an empty tensor is 0; torch refuses to reduce it
        live = [i for i in idx if tensors[i].numel() > 0] if math.isinf(p) else idx
        if live:
            vec = _as(_group_norms([tensors[i] for i in live], device, dtype, p, foreach, wide), out_dtype)
            if len(live) == len(tensors):
                return vec
            found.update(zip(live, vec.unbind()))
        for i in idx:
            if i not in found:
                found[i] = torch.zeros((), dtype=out_dtype, device=device)
    # back to input order on device: no index tensor built on the host (that would be a copy)
    return torch.stack([found[i] for i in range(len(tensors))])


def uniform_norms(
    tensors: Sequence[Tensor], norm_type: float = 2.0
) -> Callable[[list[Tensor]], Tensor] | None:
    """For tensors of one device and one float dtype whose device runs foreach kernels (p < inf):
    a function that gives what :func:`tensor_norms` gives for them (or any of them, or tensors of
    that same device and dtype), without its per-call checks and grouping (~5 µs a call on a CPU:
    a guarded step's norms are measured every step). ``None`` for any other set of tensors.
    (A ``stack`` straight into a float64 ``out`` would save the conversion's op, but takes torch's
    type-promotion path: ~11 µs against ~3.4 for the two ops on a CPU.)"""
    p = check_norm_type(norm_type)
    if not tensors or math.isinf(p):
        return None
    groups = _groups(tensors)
    if len(groups) != 1:
        return None
    ((device, dtype),) = groups
    if device.type not in _FOREACH_DEVICES or not dtype.is_floating_point:
        return None
    acc = _acc_dtype(dtype)
    arg = None if acc == dtype else acc  # the norms' dtype is then _out_dtype's: float32, or float64

    def norms(ts: list[Tensor]) -> Tensor:
        return torch.stack(torch._foreach_norm(ts, p, dtype=arg))

    return norms


def _out_dtype(groups: dict[tuple[torch.device, torch.dtype], list[int]]) -> torch.dtype:
    """The dtype of the norms: float64 when any tensor is float64, else float32."""
    return torch.float64 if any(dt == torch.float64 for _, dt in groups) else torch.float32


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (no call when it is already: a no-op ``to`` still costs ~1 µs on the host)."""
    return t if t.dtype == dtype else t.to(dtype)


def _group_norms(
    ts: list[Tensor] | tuple[Tensor, ...],
    device: torch.device,
    dtype: torch.dtype,
    p: float,
    foreach: bool | None,
    wide: bool,
) -> Tensor:
    """The norms of tensors of one device and dtype (none empty when p is inf), as one 1-D tensor."""
    acc = _acc_dtype(dtype, wide and not math.isinf(p))  # a max never overflows
    use_foreach = foreach if foreach is not None else device.type in _FOREACH_DEVICES
    if use_foreach:
        return torch.stack(torch._foreach_norm(ts, p, dtype=None if acc == dtype else acc))
    return torch.stack([torch.linalg.vector_norm(t, p, dtype=acc) for t in ts])


def total_norm(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """The norm of a vector of per-tensor norms: the global norm of all those tensors.

    Accumulated in float64, returned in ``norms.dtype`` (at least float32); 0 for no tensors.
    Same semantics as :func:`torch.nn.utils.get_total_norm`.
    """
    p = check_norm_type(norm_type)
    out_dtype = norms.dtype if norms.dtype == torch.float64 else torch.float32
    if norms.numel() == 0:
        return torch.zeros((), dtype=out_dtype, device=norms.device)
    return _as(torch.linalg.vector_norm(_as(norms, torch.float64), p), out_dtype)


def exact_norms(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """Overflow-free per-tensor norms: ``m · ‖t / m‖`` with ``m`` the max-abs, in float64.

    Two extra reads of each tensor; use it where :func:`tensor_norms` returned ``inf`` to tell a
    finite-but-huge tensor (a finite result here) from one that holds an ``inf`` (``inf`` here).
    NaN stays NaN. No host sync.
    """
    p = check_norm_type(norm_type)
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    out = []
    for t in tensors:
        if t.numel() == 0:
            out.append(torch.zeros((), dtype=torch.float64, device=t.device))
            continue
        m = torch.linalg.vector_norm(t, math.inf, dtype=_acc_dtype(t.dtype)).to(torch.float64)
        if math.isinf(p):
            out.append(m)
            continue
        safe_m = torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))
        scaled = torch.linalg.vector_norm(t.to(torch.float64) / safe_m, p)
        out.append(torch.where(torch.isfinite(m), scaled * safe_m, m + scaled))
    return torch.stack(out)


@dataclass(frozen=True)
class GradStats:
    """One step's gradient measurements (all device tensors).

    Attributes:
        norms: per-tensor p-norms (1-D, float32 or float64).
        total: the global p-norm (0-D).
        norm_type: p.
    """

    norms: Tensor
    total: Tensor
    norm_type: float

    @property
    def nan(self) -> Tensor:
        """Per-tensor flag: the tensor holds a NaN."""
        return torch.isnan(self.norms)

    @property
    def inf(self) -> Tensor:
        """Per-tensor flag: the tensor holds ±inf (or, for float32/bfloat16, overflows float32)."""
        return torch.isinf(self.norms)

    @property
    def nonfinite(self) -> Tensor:
        """0-D flag: any tensor holds NaN or ±inf."""
        return ~torch.isfinite(self.total)

    @property
    def any_nan(self) -> Tensor:
        """0-D flag: any tensor holds a NaN."""
        return torch.isnan(self.total)


def grad_stats(
    parameters: Tensor | Iterable[Tensor], norm_type: float = 2.0, *, foreach: bool | None = None
) -> GradStats:
    """Per-tensor norms, the global norm and non-finite flags of the gradients, in one pass.

    Parameters without a gradient are left out (as torch does). No host sync.
    """
    grads = grads_of(parameters)
    norms = tensor_norms(grads, norm_type, foreach=foreach)
    return GradStats(norms, total_norm(norms, norm_type), check_norm_type(norm_type))


def layer_name(param_name: str) -> str:
    """The qualified name of the module that owns a parameter: ``"encoder.0.weight" -> "encoder.0"``."""
    return param_name.rpartition(".")[0]


class LayerIndex:
    """Groups per-tensor norms by the module that owns each tensor (built once per model).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> idx = LayerIndex([n for n, _ in m.named_parameters()])
        >>> idx.layers
        ['0', '1']
        >>> idx.reduce(torch.tensor([3.0, 4.0, 0.0, 1.0])).tolist()
        [5.0, 1.0]
    """

    def __init__(self, param_names: Sequence[str]) -> None:
        self.param_names = list(param_names)
        self.layers: list[str] = list(dict.fromkeys(layer_name(n) for n in self.param_names))
        pos = {name: i for i, name in enumerate(self.layers)}
        self._layer_of = [pos[layer_name(n)] for n in self.param_names]
        self._cache: dict[tuple[tuple[int, ...] | None, torch.device], Tensor] = {}
        self._acc: dict[tuple[int, torch.device], Tensor] = {}

    def _index(self, present: Sequence[int] | None, device: torch.device) -> Tensor:
        key = (tuple(present) if present is not None else None, device)
        if key not in self._cache:
            rows = present if present is not None else range(len(self.param_names))
            self._cache[key] = torch.tensor(
                [self._layer_of[i] for i in rows], dtype=torch.long, device=device
            )
        return self._cache[key]

    @staticmethod
    def exact_in_rows(norm_type: float) -> bool:
        """Whether :meth:`reduce` over many rows at once gives each row bit for bit what it gives
        alone: for p = 0.5, 1, 2 (powers that are products, square roots or nothing) and inf (a max).
        Another p's ``pow`` may round an element differently in torch's vectorized loop and in its
        scalar tail, and where an element falls depends on the shape."""
        return norm_type in (0.5, 1.0, 2.0) or math.isinf(norm_type)

    def _zeros(self, n: int, device: torch.device) -> Tensor:
        """The float64 zeros the per-layer sums start from (only read: made once per device and size)."""
        key = (n, device)
        if key not in self._acc:
            self._acc[key] = torch.zeros(n, dtype=torch.float64, device=device)
        return self._acc[key]

    def _flat_index(self, rows: int, device: torch.device) -> Tensor:
        """Where each element of ``rows × tensors`` norms goes in the ``rows × layers`` sums, flat: one
        1-D ``index_add`` then sums every row in the order one row alone sums (made on the device)."""
        key = ((-rows,), device)  # apart from the keys of `present` tuples
        if key not in self._cache:
            index = self._index(None, device)
            start = torch.arange(rows, device=device).unsqueeze(1) * len(self.layers)
            self._cache[key] = (start + index).reshape(-1)
        return self._cache[key]

    def reduce(
        self,
        norms: Tensor,
        norm_type: float = 2.0,
        present: Sequence[int] | None = None,
        *,
        wide: Tensor | None = None,
    ) -> Tensor:
        """Per-layer norms (one per entry of :attr:`layers`) from per-tensor norms.

        Args:
            norms: per-tensor norms, for all parameters or for those listed in ``present``; or
                many rows of them (``rows × tensors``, all parameters): then ``rows × layers``,
                each row what it gives alone (bit for bit for the p of :meth:`exact_in_rows`).
            norm_type: p of the norms.
            present: positions (in ``param_names``) of the tensors ``norms`` holds, when only
                some parameters had a gradient. Layers with no tensor get 0.
            wide: ``norms`` already in float64 (the caller converted them for the global norm):
                the conversion is not made twice.
        """
        p = check_norm_type(norm_type)
        rows = norms.shape[0] if norms.dim() == 2 else None
        index = self._index(present, norms.device) if rows is None else self._flat_index(rows, norms.device)
        acc = self._zeros(len(self.layers) * (rows or 1), norms.device)
        n64 = (wide if wide is not None else norms.to(torch.float64)).reshape(-1)
        if math.isinf(p):
            out = acc.scatter_reduce(0, index, n64, reduce="amax", include_self=True)
            # scatter amax drops NaN on some backends: put NaN back explicitly
            nan_rows = torch.zeros_like(acc).index_add_(0, index, torch.isnan(n64).to(torch.float64))
            out = torch.where(nan_rows > 0, torch.full_like(out, math.nan), out)
        else:
            out = acc.index_add(0, index, n64.pow(p)).pow(1.0 / p)
        if rows is not None:
            out = out.reshape(rows, len(self.layers))
        return out.to(norms.dtype)


def update_ratios(update_norms: Tensor, weight_norms: Tensor, eps: float = 1e-12) -> Tensor:
    """‖Δw‖ / ‖w‖ elementwise over per-tensor (or per-layer) norms.

    ``update_norms`` are the norms of the optimizer's update (or of ``w_after - w_before``);
    ``weight_norms`` those of the pre-step weights. A zero weight gives ``‖Δw‖ / eps``.
    """
    return update_norms / weight_norms.clamp_min(eps)
