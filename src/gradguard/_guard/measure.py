"""Measure a step: gradient norms, the loss and the non-finite flags, as device tensors.

The gradients are read once (one foreach norm pass); under torch.distributed one all-reduce makes
the numbers the same on every rank. Nothing here reads a device value on the host, except
:meth:`Meter.exact_total` and :meth:`Meter.weights_finite`, which run on the anomaly path only. A
CPU step's loss and global norm are read on the host (a CPU value: the read waits for no device),
and its tests and small numbers are made there and written into its row's memory
(:attr:`Measurement.host`): no op for what costs ~1.5–5 µs of dispatch a tensor op.

Where the step has its record's rows (:meth:`gradguard.monitor.Monitor.next_rows`) the numbers are
made there: the float64 per-tensor norms in the row for them, ``[loss, global norm]`` in the first
two columns of the step's row. The non-finite test is one op, whose result the flags, the skip flag
and the clip coefficient share (:attr:`Measurement.probe`); the per-flag bools are made only
where something asks for them (:meth:`Measurement.flags`): the row leaves them to the host, which
derives them from the row's loss and norm (:func:`gradguard.record.derive`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from gradguard import _step_kernel, clip
from gradguard._distributed import Reducer, any_dtensor, local
from gradguard._kernels import grad_norms, usable
from gradguard.clip import COEF_EPS
from gradguard.errors import GradGuardError
from gradguard.record import COLUMN
from gradguard.stats import (
    LayerIndex,
    check_tensors,
    exact_norms,
    layer_name,
    tensor_norms,
    total_norm,
    uniform_norms,
    update_ratios,
)

__all__ = ["Constants", "Measurement", "Meter", "NextRows", "check_loss"]

#: ``(device, tensors) -> (row, norms)``: the views of the monitor's buffers the next record uses
#: (:meth:`gradguard.monitor.Monitor.next_rows`); either may be ``None``.
NextRows = Callable[[torch.device, int], tuple[Tensor | None, Tensor | None]]

_VALUES = 2  # ``values`` are the row's first columns: loss, grad_norm
assert (COLUMN["loss"], COLUMN["grad_norm"]) == (0, 1)
_T = TypeVar("_T")
_ROW_VIEWS = 4096  # rows whose views are kept (the monitor's buffer rows: ``every`` of them)
_ABSENT_CACHE = 64  # patterns of missing gradients remembered (a model usually has one or two)
_CONSTANTS = 64  # device constants kept (a handful in use)


def host_view(t: Tensor) -> Any | None:
    """A NumPy view of a CPU tensor's memory (``Tensor.numpy()``: gradguard imports no NumPy), for
    the host path's writes into the step's row: ~0.1 µs against ~1.5–5 µs of dispatch for a tensor
    op; torch's CPU ops are synchronous, so a write after an op follows its result. ``None`` where
    torch runs without NumPy (the CPU then takes the device path)."""
    try:
        return t.numpy()
    except RuntimeError:  # "Numpy is not available"
        return None


class Constants:
    """Small device constants, made once per device (no allocation per step)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, torch.device], Any] = {}
        self._made: dict[int, Any] = {}  # id → constant (each held here: its id is not reused)

    def _get(self, key: Any, device: torch.device, make: Callable[[], _T]) -> _T:
        t: _T | None = self._cache.get((key, device))
        if t is None:
            if len(self._cache) >= _CONSTANTS:  # e.g. a norm threshold the user changes every step
                self._cache.clear()
                self._made.clear()
            t = self._cache[(key, device)] = make()
            self._made[id(t)] = t
        return t

    def made(self, t: Tensor) -> bool:
        """Whether ``t`` is one of these constants (the same tensor, never written, each step that
        asks for it): the row may bake it into its own constants."""
        return self._made.get(id(t)) is t

    def get(self, key: Any, device: torch.device, make: Callable[[], _T], *, of: tuple[Any, ...] = ()) -> _T:
        """What ``make()`` gives (device tensors), made once for ``key`` and the objects ``of`` (what
        it is made from: named by identity). The entry holds them, so no other object takes their
        ids while it lives (a cleared cache drops a constant that an entry made after it names: a
        threshold the user changes every step; its id could then name the next one's entry)."""
        if not of:
            return self._get(key, device, make)
        held: tuple[tuple[Any, ...], _T] = self._get((key, *map(id, of)), device, lambda: (of, make()))
        return held[1]

    def false(self, device: torch.device) -> Tensor:
        """A 0-D ``False``."""
        return self._get("false", device, lambda: torch.zeros((), dtype=torch.bool, device=device))

    def number(self, value: float, device: torch.device) -> Tensor:
        """A 0-D float32 ``value`` (NaN for a column a step has no value for, a fixed threshold)."""
        found = self._cache.get((value, device))  # the number as it is (NaN: found by identity)
        if found is None:
            key = ("number", _key(value))
            found = self._get(key, device, lambda: torch.full((), value, dtype=torch.float32, device=device))
            self._cache[(value, device)] = found
        return found

    def numbers(self, values: tuple[float, ...], device: torch.device) -> Tensor:
        """A 1-D float32 of ``values`` (e.g. the ``[clip_coef, threshold]`` of a step without norm
        clipping: ``[nan, inf]``)."""
        found = self._cache.get((values, device))  # a module-level tuple: found as it is (NaN by identity)
        if found is None:
            key = ("numbers", tuple(_key(v) for v in values))
            found = self._get(key, device, lambda: torch.tensor(values, dtype=torch.float32).to(device))
            self._cache[(values, device)] = found
        return found


def _nonfinite(values: tuple[float, ...]) -> bool:
    """Whether any of the host ``values`` is not finite."""
    return not all(map(math.isfinite, values))


def _key(value: float) -> float | str:
    """``value`` as a cache key (NaN is not equal to itself)."""
    return "nan" if math.isnan(value) else value


@dataclass
class Measurement:
    """What a step measured (device tensors)."""

    device: torch.device
    grads: list[Tensor]  # the gradients present (this rank's shards under FSDP2)
    present: list[int]  # their indices among the guarded parameters
    norms: Tensor  # per-tensor norms (full-tensor norms under FSDP2)
    total: Tensor  # the global norm
    values: Tensor  # [loss, global norm] as float32 (the loss 0 without one)
    nonfinite: Tensor | None  # [loss non-finite, gradients non-finite]; None: made on first use (flags())
    grad_nan: Tensor | None  # a gradient holds a NaN; None: made on first use (nan())
    bad: Tensor  # the loss or a gradient is non-finite
    absent: tuple[int, ...] = ()  # layers none of whose parameters has a gradient (logged as null)
    wide: Tensor | None = None  # ``norms`` in float64, where the global norm was summed from them
    row: Tensor | None = None  # where the step's row goes (the monitor's next row); None: a new tensor
    local_flags: bool = (
        True  # ``nonfinite`` says only whether the loss and the global norm are (no rank's own)
    )
    #: ``[[loss·0, norm·0], [loss·0, 1e-6 + norm·0]]`` (float32) from ``values``: 0 where a value is
    #: finite, NaN where not (x·0 is NaN exactly for ±inf and NaN): the step's one non-finite test.
    #: ``probe[0]`` holds the flags, ``probe[1, 1]`` the clip coefficient's 1e-6-or-NaN.
    #: ``None`` where the flags hold more than ``values`` say (a rank's own, under torch.distributed).
    #: The meter's buffer: valid until its next measure (the step's own uses come before).
    probe: Tensor | None = None
    values_in_row: bool = False  # ``values`` is ``row[:2]`` (measured in place)
    #: a CPU step's ``values`` read on the host ``(loss, global norm)``, with its bad flag: the step's
    #: tests then run there, and its small numbers are written into the row's memory, not by ops
    #: (:meth:`put`, :func:`host_view`); ``None``: the device path
    host: tuple[float, float] | None = None
    #: views of ``row`` (and ``probe``) by key, made once: the meter keeps them per row
    views: dict[Any, Tensor] = field(default_factory=dict)
    _observed: Tensor | None = None
    _flags: tuple[Tensor, ...] | None = None

    def flags(self) -> tuple[Tensor, ...]:
        """``nonfinite`` as two 0-D bool views ``(loss non-finite, gradients non-finite)``, made on
        first use (the usual step asks for none: its row leaves them to the host)."""
        if self._flags is None:
            if self.nonfinite is None:
                assert self.probe is not None
                self.nonfinite = torch.isnan(self._probe_part("flags", 0))
            self._flags = self.nonfinite.unbind()
        return self._flags

    def nan(self) -> Tensor:
        """``grad_nan`` (a gradient holds a NaN, not only ±inf), made on first use."""
        if self.grad_nan is None:
            self.grad_nan = torch.isnan(self.total)
        return self.grad_nan

    @property
    def flags_from_values(self) -> bool:
        """Whether the flags are functions of ``values`` alone (no rank's own): the host may derive them."""
        return self.probe is not None

    def finite_eps(self) -> Tensor | None:
        """The clip coefficient's 1e-6, NaN where the global norm is not finite
        (:func:`gradguard.clip.coefficient`'s ``finite_eps``): where the norm is float32 (``values``
        holds the very norm) and the flags are the step's own; else ``None``."""
        if self.probe is None or self.total.dtype != torch.float32:
            return None
        return self._probe_part("eps", (1, 1))

    def _probe_part(self, key: str, index: Any) -> Tensor:
        assert self.probe is not None
        found = self.views.get(key)
        if found is None:
            found = self.views[key] = self.probe[index]
        return found

    @property
    def host_bad(self) -> bool:
        """On the host path: whether the loss or the global norm is not finite."""
        assert self.host is not None
        return _nonfinite(self.host)

    def put(self, name: str, value: float) -> Tensor:
        """On the host path: write ``value`` into column ``name`` of the row's memory (float32, rounded
        as ``Tensor.to``), no op; returns the column (its 0-D view)."""
        column = self.column(name)
        assert column is not None
        self._host_row()[COLUMN[name]] = value
        return column

    def put_columns(self, start: int, values: Any) -> None:
        """On the host path: copy ``values`` (a NumPy array) into the row's columns ``start:``."""
        self._host_row()[start:] = values

    def _host_row(self) -> Any:
        assert self.host is not None and self.row is not None and self.values_in_row
        found: Any = self.views.get("host")  # (a NumPy array among the views)
        if found is None:
            found = self.views["host"] = host_view(self.row)  # type: ignore[assignment]
        return found

    def column(self, name: str) -> Tensor | None:
        """Column ``name`` of the step's row (a 0-D view, made once per row), for an op to write its
        result straight there; ``None`` without a row made in place."""
        return self.columns(COLUMN[name], COLUMN[name] + 1, 0)

    def columns(self, start: int, stop: int, dim: int = 1) -> Tensor | None:
        """Columns ``start:stop`` of the step's row (a 1-D view, or a 0-D one with ``dim=0``, made
        once per row); ``None`` without a row made in place."""
        if not self.values_in_row or self.row is None:
            return None
        key = (start, stop, dim)
        found = self.views.get(key)
        if found is None:
            found = self.views[key] = self.row[start:stop] if dim else self.row[start]
        return found

    def observed(self, consts: Constants, *, read_only: bool = False) -> Tensor:
        """The global norm, NaN on a bad step: what adaptive state (an adaptive clipper, the spike
        detector) may learn from. Made on first use (a step with a fixed threshold needs none).
        ``read_only``: the caller only reads it (gradguard's own rules): on the CPU it is then the
        measured total itself or a shared NaN constant, the bad flag read on the host (no op)."""
        if read_only and self.total.dtype is torch.float32:
            if self.host is not None:
                return consts.number(math.nan, self.device) if self.host_bad else self.total  # (float32 both)
            if clip._reads_on_host(self.bad):
                bad = bool(self.bad)  # host sync: a CPU value
                return consts.number(math.nan, self.device) if bad else self.total
        if self._observed is None:
            self._observed = torch.where(self.bad, consts.number(math.nan, self.device), self.total)
        return self._observed


class _Numbers(NamedTuple):
    """What :meth:`Meter.measure` makes from the norms (see :class:`Measurement`)."""

    wide: Tensor
    total: Tensor
    values: Tensor
    bad: Tensor
    nonfinite: Tensor | None = None
    grad_nan: Tensor | None = None
    host: tuple[float, float] | None = None


class _Probe:
    """The step's non-finite test on one device (see :attr:`Measurement.probe`): the buffer ``out``,
    the ``[[0, 0], [0, 1e-6]]`` and the 0 it is made from (``base + values·0``), its views
    (``"flags"``, ``"eps"``) and the bad flag's two values, all made once."""

    def __init__(self, device: torch.device) -> None:
        self.out = torch.empty(2, 2, dtype=torch.float32, device=device)
        self.base = torch.tensor([[0.0, 0.0], [0.0, COEF_EPS]], dtype=torch.float32).to(device)
        self.zero = torch.zeros((), dtype=torch.float32, device=device)
        self.parts = {"flags": self.out[0], "eps": self.out[1, 1]}
        self.false = torch.zeros((), dtype=torch.bool, device=device)
        self.true = torch.ones((), dtype=torch.bool, device=device)
        self._host = host_view(self.out) if device.type == "cpu" else None

    def test_on_host(self, values: Tensor) -> tuple[float, float] | None:
        """A CPU step's test on the host: ``values`` read there (a CPU value: the read waits for no
        device), the probe written into ``out``'s memory as ``base + values·0`` would make it.
        ``None`` where the step takes the device path (no NumPy, tests pin it, a compiled region)."""
        if self._host is None or not clip._reads_on_host(values):
            return None
        loss, total = values.tolist()  # host sync: a CPU value
        flags = (0.0 if math.isfinite(loss) else math.nan, 0.0 if math.isfinite(total) else math.nan)
        self._host[0] = flags
        self._host[1] = (flags[0], COEF_EPS + flags[1])  # (stored as float32: base's 1e-6)
        return loss, total


class Meter:
    """Measures the guarded parameters' gradients (and, on cadence steps, their weights)."""

    def __init__(
        self,
        params: Sequence[Tensor],
        norm_type: float,
        index: LayerIndex,
        reducer: Reducer | None,
        *,
        sparse: bool = False,
    ) -> None:
        self.params = params
        self.sparse = sparse  # the model has an nn.Embedding(sparse=True): see _sparse_gradients
        self._dtensors = any_dtensor(params)  # FSDP2: its gradients are read by their local shards
        self.norm_type = norm_type
        self.index = index
        self.reducer = reducer
        self._absent: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._positions: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}
        self._every: list[int] = []  # range(len(params)): the indices of a step with every gradient
        self._uniform = _uniform(params, norm_type)
        # a layer step records its per-tensor norms, reduced to per-layer norms at the flush
        self.reduces_at_flush = LayerIndex.exact_in_rows(norm_type)
        self._row_views: dict[int, tuple[Tensor, dict[Any, Tensor]]] = {}  # id(row) → (row, views)
        self._probes: dict[torch.device, _Probe] = {}

    def reindex(self, index: LayerIndex, reducer: Reducer | None) -> None:
        """Parameters joined: the new layer index (and the all-reduce that covers them)."""
        self.index, self.reducer = index, reducer
        self._dtensors = any_dtensor(self.params)
        self._uniform = _uniform(self.params, self.norm_type)
        self._absent.clear()
        self._positions.clear()

    def absent_layers(self, present: Sequence[int]) -> tuple[int, ...]:
        """The layers none of whose parameters is in ``present`` (cached per pattern: host work only
        on a step whose set of gradients differs from all the steps before)."""
        if len(present) == len(self.params):
            return ()
        key = tuple(present)
        found = self._absent.get(key)
        if found is None:
            have = {layer_name(self.index.param_names[i]) for i in present}
            found = tuple(j for j, name in enumerate(self.index.layers) if name not in have)
            if len(self._absent) >= _ABSENT_CACHE:
                self._absent.clear()
            self._absent[key] = found
        return found

    def _gradients(self) -> tuple[list[Tensor], list[int]]:
        """The gradients present and their indices (one ``.grad`` read per parameter; the indices
        of a step where every parameter has one are made once)."""
        if self.sparse:
            return self._sparse_gradients()
        grads = [g for w in self.params if (g := w.grad) is not None]
        if len(grads) == len(self.params):
            if len(self._every) != len(grads):
                self._every = list(range(len(grads)))
            return grads, self._every
        return grads, [i for i, w in enumerate(self.params) if w.grad is not None]

    def _sparse_gradients(self) -> tuple[list[Tensor], list[int]]:
        """:meth:`_gradients` where a gradient can be sparse (``nn.Embedding(sparse=True)``, whose
        gradients ``clip_grad_norm_`` cannot read): a sparse one is coalesced (the parameter's ``.grad``
        becomes the coalesced copy, which every optimizer steps alike: duplicate rows summed) and
        stands as its values, a dense view of them. Its norm is the gradient's, its non-finite
        values are the gradient's, and clipping scales the values the optimizer reads."""
        grads: list[Tensor] = []
        present: list[int] = []
        for i, w in enumerate(self.params):
            g = w.grad
            if g is None:
                continue
            if g.layout is torch.sparse_coo:
                if not g.is_coalesced():
                    g = w.grad = g.coalesce()
                g = g._values()
            grads.append(g)
            present.append(i)
        return grads, present

    def measure(
        self,
        loss: Tensor | float | None,
        rows: NextRows | None = None,
        *,
        known: tuple[Sequence[Tensor], Tensor] | None = None,
    ) -> Measurement:
        """Norms, loss and flags of this step (no host read).

        ``rows(device, tensors)``: where the step's record goes (:meth:`gradguard.monitor.Monitor.next_rows`):
        the float64 per-tensor norms are made there (the record then copies neither them nor the row).
        ``known = (grads, norms)``: per-tensor norms the caller computed already as
        ``torch.stack(torch._foreach_norm(grads, p))`` (the script's own clip, under ``gradguard
        run``): used instead of reading the gradients again where they are exactly what this meter
        computes (see :meth:`_known_norms`), else ignored.
        """
        grads, present = self._gradients()
        device = grads[0].device if grads else self.params[0].device
        absent = self.absent_layers(present) if self.reducer is None else ()  # all ranks' norms: not local
        if self.reducer is not None or self._dtensors:
            grads = [local(g) for g in grads]  # FSDP2: this rank's shards (the whole tensor in one process)
        row, into = rows(device, len(self.params)) if rows is not None else (None, None)
        norms = self._known_norms(grads, known) if known is not None else None
        if norms is None:
            norms = self.tensor_norms(grads)  # the one read of the gradients
        loss_val = _loss_value(loss, device)
        rank_flags = None
        if (
            self.reducer is not None and not self.reducer.paused
        ):  # the same numbers on every rank: one all-reduce
            if len(present) != len(self.params):  # same vector on every rank: a missing grad has norm 0
                norms = torch.zeros(len(self.params), dtype=norms.dtype, device=device).index_copy(
                    0, torch.tensor(present, device=device), norms
                )
                present = list(range(len(self.params)))
            norms, loss_val, rank_flags = self.reducer.reduce(norms, loss_val, present)
        pr = self._probe(device)
        if row is not None and row.device != device:
            row = None
        views = self._views(row, pr.parts) if row is not None else dict(pr.parts)
        n = self._numbers(norms, loss_val, into, row, views, pr, rank_flags)
        return Measurement(
            device,
            grads,
            present,
            norms,
            n.total,
            n.values,
            n.nonfinite,
            n.grad_nan,
            n.bad,
            absent,
            n.wide,
            row,
            local_flags=rank_flags is None,
            probe=pr.out if rank_flags is None else None,
            values_in_row=row is not None,
            host=n.host,
            views=views,
        )

    def _views(self, row: Tensor, parts: dict[Any, Tensor]) -> dict[Any, Tensor]:
        """The views of one of the monitor's rows, made once per row (each view costs ~1 µs on the
        host): ``"values"`` (its first two columns) and the probe's ``parts``, more added on use."""
        found = self._row_views.get(id(row))
        if found is None or found[0] is not row:
            if len(self._row_views) >= _ROW_VIEWS:  # (a monitor whose rows are not views made once)
                self._row_views.clear()
            found = self._row_views[id(row)] = (row, {"values": row[:_VALUES], **parts})
        return found[1]

    def _numbers(
        self,
        norms: Tensor,
        loss: Tensor,
        into: Tensor | None,
        row: Tensor | None,
        views: dict[Any, Tensor],
        pr: _Probe,
        rank_flags: Tensor | None,
    ) -> _Numbers:
        """The step's numbers from its norms: in one launch (a GPU); else by ops, the flags then
        tested on the host (a CPU step), made with a rank's own (torch.distributed), or by one op."""
        if row is not None and rank_flags is None:
            fused = self._in_one_launch(norms, loss, into, views, pr)
            if fused is not None:
                return _Numbers(fused.wide, fused.total, views["values"], fused.bad)
        wide = _wide(norms, into)  # the global norm sums these, and so do the per-layer norms
        total = _total(wide, self.norm_type, norms.dtype)
        total32 = total if total.dtype is torch.float32 else total.float()
        if row is not None:  # [loss, global norm] made in the row's first columns
            values = torch.stack([loss, total32], out=views["values"])
        else:
            values = torch.stack([loss, total32])
        if (
            rank_flags is not None
        ):  # a value on one rank only (its loss, or its copy of a gradient) is flagged too
            nonfinite = torch.isnan(values - values) | rank_flags[:2]
            return _Numbers(
                wide, total, values, nonfinite.any(), nonfinite, torch.isnan(total) | rank_flags[2]
            )
        host = pr.test_on_host(values) if row is not None else None
        if host is not None:  # a CPU step: tested on the host, the probe written there (no op)
            return _Numbers(wide, total, values, pr.true if _nonfinite(host) else pr.false, host=host)
        torch.addcmul(pr.base, values, pr.zero, out=pr.out)  # one op: 0 where finite, NaN where not
        return _Numbers(wide, total, values, views["flags"].any())  # (a NaN is true)

    def _in_one_launch(
        self, norms: Tensor, loss: Tensor, into: Tensor | None, views: dict[Any, Tensor], pr: _Probe
    ) -> _step_kernel.Measured | None:
        """The step's numbers from its norms in one launch (:mod:`gradguard._step_kernel`) where it
        takes them (a GPU); else ``None`` (the ops)."""
        if not _step_kernel.usable(norms, self.norm_type):
            return None
        fits = into is not None and into.shape == norms.shape and into.device == norms.device
        return _step_kernel.measure(
            norms, loss, into if fits else None, views["values"], pr.out, self.norm_type
        )

    def _probe(self, device: torch.device) -> _Probe:
        """The buffer :attr:`Measurement.probe` is written into (one per device: it holds a step's
        probe until the next measure, all a step needs of it) and what it is made from, made once."""
        found = self._probes.get(device)
        if found is None:
            found = self._probes[device] = _Probe(device)
        return found

    def tensor_norms(self, grads: list[Tensor]) -> Tensor:
        """The per-tensor norms of the gradients present, as one 1-D tensor: the step's one read of
        the gradients (the place for a device kernel that reads them once).

        The gradients are not checked one by one each step (~0.3 µs a tensor): torch keeps a
        gradient's dtype and device those of its parameter, which the guard checked when it joined;
        a sparse gradient (or another the norm cannot read) fails the norm, and then gets its clear
        error from :func:`~gradguard.stats.check_tensors`.
        """
        uniform = self._uniform
        try:
            if uniform is not None and grads and grads[0].dtype is uniform[1]:  # (after model.half(): not)
                return uniform[0](grads)  # a CPU's one dtype: tensor_norms without its checks
            return grad_norms(grads, self.norm_type)  # Triton kernels on CUDA (_kernels); else tensor_norms
        except (RuntimeError, NotImplementedError):
            check_tensors(grads, what="gradient")  # raises the clear error, if it is one of those
            raise

    def _known_norms(self, grads: list[Tensor], known: tuple[Sequence[Tensor], Tensor]) -> Tensor | None:
        """The caller's norms of these very gradients, where they are bit for bit what
        :meth:`tensor_norms` would give: no all-reduce, the same gradient objects in the same order,
        float32 norms of float32 gradients measured on the torch path (not the Triton kernels)."""
        theirs, norms = known
        if self.reducer is not None or norms.dtype != torch.float32 or norms.shape != (len(grads),):
            return None
        if len(theirs) != len(grads) or not all(a is b for a, b in zip(theirs, grads)):
            return None
        if any(g.dtype != torch.float32 for g in grads):
            return None
        if grads and usable(grads, self.norm_type):  # (CUDA: the kernels' rounding differs)
            return None
        return norms

    def layer_norms(self, m: Measurement) -> Tensor:
        """Per-layer gradient norms (in the order of the layer index)."""
        return self.index.reduce(m.norms, self.norm_type, m.present, wide=m.wide)

    def layer_record(self, m: Measurement) -> Tensor:
        """What a layer step records of its gradient norms: the per-tensor norms (float64, every
        tensor; 0 for those without a gradient), which the monitor reduces for all its rows at once at
        the flush (:meth:`reduce_rows`); the per-layer norms where that would not be exact."""
        if not self.reduces_at_flush:
            return self.layer_norms(m)
        assert m.wide is not None
        if len(m.present) == len(self.params):
            return m.wide
        key = (tuple(m.present), m.device)
        at = self._positions.get(key)
        if at is None:
            if len(self._positions) >= _ABSENT_CACHE:
                self._positions.clear()
            at = self._positions[key] = torch.tensor(m.present, dtype=torch.long).to(m.device)
        return m.wide.new_zeros(len(self.params)).index_copy_(0, at, m.wide)

    def reduce_rows(self, rows: Tensor) -> Tensor:
        """Per-layer gradient norms of many recorded rows at once (``rows × tensors``): the monitor's
        ``reduce`` (each row bit for bit what :meth:`layer_norms` gives for its step). Rows recorded
        before parameters joined an existing layer are narrower: the joined tensors count 0 there."""
        missing = len(self.index.param_names) - rows.shape[-1]
        if missing > 0:
            rows = torch.cat([rows, rows.new_zeros(rows.shape[0], missing)], dim=-1)
        return self.index.reduce(rows, self.norm_type)

    def copy_weights(self) -> list[Tensor]:
        """A copy of the weights before the step (for the update ratios of a cadence step)."""
        return [w.detach().clone() for w in self.params]

    def weight_stats(self, before: list[Tensor]) -> dict[str, Tensor]:
        """Per-layer weight norms and update/weight ratios, from the weights before the step."""
        p = self.norm_type
        with torch.no_grad():
            before = [local(w) for w in before]
            after = [local(w.detach()) for w in self.params]
            w_t, u_t = tensor_norms(before, p), tensor_norms(torch._foreach_sub(after, before), p)
            if self.reducer is not None:
                w_t, u_t = self.reducer.full_norms(w_t), self.reducer.full_norms(u_t)
            w_norms, u_norms = self.index.reduce(w_t, p), self.index.reduce(u_t, p)
        return {"weight_norm": w_norms, "update_ratio": update_ratios(u_norms, w_norms)}

    def exact_total(self, m: Measurement) -> Tensor | None:
        """On a bad step whose gradients are all finite but whose float32 norm overflowed: the exact
        global norm (float64, the overflowing tensors measured scaled by their max-abs); else ``None``.

        Host reads: the anomaly path only. Call it when the loss is finite and no gradient is NaN.
        """
        overflowed = torch.isinf(m.norms)
        suspects = [g for g, inf in zip(m.grads, overflowed.tolist()) if inf]  # host sync: anomaly path
        if not suspects:
            return None
        exact = exact_norms(suspects, self.norm_type)
        if not bool(torch.isfinite(exact).all()):  # host sync: anomaly path
            return None
        fixed = m.norms.to(torch.float64).clone()
        fixed[overflowed] = exact.to(fixed.device)
        return total_norm(fixed, self.norm_type)

    def weights_finite(self) -> bool:
        """Whether every guarded weight (this rank's shard of it) is finite, element by element: a
        norm would overflow on weights that are only large (1e28). Host read: the abort path only."""
        with torch.no_grad():
            flags = [torch.isfinite(local(w.detach())).all() for w in self.params]
        return bool(torch.stack(flags).all()) if flags else True  # host sync: abort path


def check_loss(loss: Any) -> None:
    """Refuse, at the call, a loss that is not a number, a non-empty real tensor or ``None``."""
    if loss is None:
        return
    if not isinstance(loss, Tensor):  # (a tensor first: an ABC check costs ~1 µs a step)
        if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            return
        shown = repr(loss)
        shown = (
            f" {shown}" if len(shown) <= 80 and "\n" not in shown else ""
        )  # (an optimizer's repr: many lines)
        raise GradGuardError(
            f"the loss must be a tensor, a number or None; got {type(loss).__name__}{shown}. "
            "Pass the loss you called backward() on: guard.step(loss) (or a closure that returns it)."
        )
    n = loss.numel()
    if n == 0:
        raise GradGuardError(
            f"the loss is an empty tensor (shape {tuple(loss.shape)}): there is no value to check. Pass "
            "the scalar loss you called backward() on (a mean over an empty batch is NaN: skip the batch)."
        )
    if not loss.is_floating_point() and not loss.is_complex():
        raise GradGuardError(
            f"the loss is a {loss.dtype} tensor{' (a comparison?)' if loss.dtype is torch.bool else ''}: there "
            "is no loss value to check. Pass the floating-point loss you called backward() on (guard.step(loss)), "
            "not a flag or a count made from it."
        )
    if loss.is_complex():
        raise GradGuardError(
            f"the loss is a complex tensor ({loss.dtype}); gradguard checks a real loss. Pass the real "
            "scalar you called backward() on (e.g. `loss.abs()` or `loss.real`)."
        )
    if n > 1:
        warnings.warn(
            f"gradguard got a loss of shape {tuple(loss.shape)}, not a scalar: it checks and logs the "
            "sum of its elements. Pass the scalar you called backward() on (e.g. `loss.mean()`) so the "
            "run log shows your loss.",
            stacklevel=4,
        )


def _uniform(
    params: Sequence[Tensor], p: float
) -> tuple[Callable[[list[Tensor]], Tensor], torch.dtype] | None:
    """Parameters of one dtype on one device that is not CUDA (where the Triton kernels may read the
    gradients): the norms function of :func:`~gradguard.stats.uniform_norms` and that dtype; else
    ``None`` (:func:`~gradguard._kernels.grad_norms` then groups the gradients every step)."""
    if not params or params[0].device.type == "cuda":
        return None
    norms = uniform_norms(params, p)
    return None if norms is None else (norms, params[0].dtype)


def _wide(norms: Tensor, into: Tensor | None) -> Tensor:
    """``norms`` in float64: converted into ``into`` (the monitor's row for them) when it fits, in
    one copy that the step's record then skips; else a new tensor."""
    if into is not None and into.shape == norms.shape and into.device == norms.device:
        return into.copy_(norms)
    return norms.to(torch.float64)


def _total(wide: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """The global norm from the float64 per-tensor norms, in ``dtype`` (the norms'): what
    :func:`~gradguard.stats.total_norm` gives, without its checks on the step's path (``p`` was
    checked when the guard was made; ``wide`` is float64 on the norms' device)."""
    if wide.numel() == 0:
        return total_norm(wide, p).to(dtype)
    total = torch.linalg.vector_norm(wide, p)
    if dtype is torch.float32:
        return total.float()  # (the same op as ``to``, ~1 µs less on the host)
    return total if dtype == torch.float64 else total.to(dtype)


def _loss_value(loss: Tensor | float | None, device: torch.device) -> Tensor:
    """The loss as a 0-D float32 on ``device`` (0 without one: the log then says null)."""
    if isinstance(loss, Tensor):
        val = loss.detach() if loss.requires_grad else loss  # (``gradguard run`` passes it detached)
        if val.dim() != 0:
            val = val.reshape(()) if val.numel() == 1 else val.sum()
        if val.dtype == torch.float32 and val.device == device:
            return val  # the usual loss: no call at all (a no-op ``to`` still costs ~1 µs)
        return val.to(device=device, dtype=torch.float32)
    return torch.full((), 0.0 if loss is None else float(loss), device=device)
