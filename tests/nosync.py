"""Test helper: prove a code path never reads a device value on the host, and count its passes.

``NoSync`` is a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that sees every aten
op run inside it. It

* raises :class:`HostSyncError` on every op that needs a device value on the host: ``.item()``,
  ``float(t)``, ``int(t)``, ``bool(t)`` (all ``aten._local_scalar_dense``), ``torch.equal``, ``allclose``,
  ``is_nonzero``, ops whose output shape depends on the data (``nonzero``, ``masked_select``,
  ``unique``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``), and copies
  from a device to the CPU. On CUDA each of these waits for the GPU; on CPU they are free, but
  the same code would sync on a GPU, so they are refused on every device. Run the code on
  ``meta`` tensors as well to be sure no path reads data outside the dispatcher;
* records host-to-device copies (``cpu`` → any other device) in :attr:`NoSync.h2d` (or raises
  on them with ``h2d="raise"``): a pageable copy is a sync on CUDA;
* counts, for each watched tensor, the ops that take it (or a view of it) as an input:
  :attr:`NoSync.reads`, with the op names in :attr:`NoSync.read_ops`, and separately the ops
  that write to it (in-place / ``out=``) in :attr:`NoSync.writes`. View and metadata ops
  (``view``, ``select``, ``detach``, ``unbind`` …) move no data and are not counted. Tensors
  are identified by their storage, so views of a watched tensor count for it.

A sync that the code under test catches and swallows is still reported: leaving the block
raises :class:`HostSyncError` for it.

Example::

    grads = [p.grad for p in model.parameters()]
    with NoSync(watch=grads) as ns:
        gradguard.clip_grad_norm_(model.parameters(), 1.0)
    assert ns.reads == [2] * len(grads)      # one norm pass + one scale pass
    with NoSync() as ns:
        with ns.allow():                      # a deliberate, named sync
            float(loss)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import gradguard.clip

__all__ = ["HostSyncError", "NoSync", "storage_key"]

aten = torch.ops.aten


class HostSyncError(AssertionError):
    """An op inside :class:`NoSync` needed a device value on the host."""


def storage_key(t: Tensor) -> int | None:
    """An identity shared by a tensor and all its views (its storage), or None without one."""
    try:
        return int(t.untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


# ops whose result is a host value, or whose output shape depends on the tensor's data
_SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.allclose.default,
    aten.nonzero.default,
    aten.masked_select.default,
}
_SYNC_PACKETS = {
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
}
# metadata-only ops that move no data (views are recognised by `func.is_view`)
_NO_DATA = {
    aten.sym_size.int,
    aten.sym_stride.int,
    aten.sym_numel.default,
    aten.sym_storage_offset.default,
    aten.is_same_size.default,
    aten._has_compatible_shallow_copy_type.default,
    aten.lift_fresh.default,
}


def _device_of(x: Any) -> torch.device | None:
    if isinstance(x, torch.device):
        return x
    if isinstance(x, str):
        return torch.device(x)
    return None


class NoSync(TorchDispatchMode):
    """Refuse host syncs and count reads of watched tensors (see the module docstring).

    Args:
        watch: tensors whose reads and writes are counted, in this order.
        h2d: ``"record"`` host-to-device copies in :attr:`h2d`, or ``"raise"`` on them.

    Attributes:
        reads: per watched tensor, how many ops took it (or a view of it) as an input.
        writes: per watched tensor, how many ops wrote to it.
        read_ops: per watched tensor, the names of those reading ops, in order.
        h2d: a line per host-to-device copy seen.
        syncs: a line per refused host read (also raised at once).
    """

    def __init__(self, watch: Iterable[Tensor] = (), *, h2d: Literal["record", "raise"] = "record") -> None:
        super().__init__()
        if h2d not in ("record", "raise"):
            raise ValueError(f"h2d must be 'record' or 'raise', got {h2d!r}")
        self.watched: list[Tensor] = list(watch)  # references keep the storages (and keys) alive
        self._slot: dict[int, list[int]] = {}
        for i, t in enumerate(self.watched):
            key = storage_key(t)
            if key is None:
                raise ValueError(f"NoSync cannot watch a tensor without storage: {type(t).__name__}")
            self._slot.setdefault(key, []).append(i)
        self.reads = [0] * len(self.watched)
        self.writes = [0] * len(self.watched)
        self.read_ops: list[list[str]] = [[] for _ in self.watched]
        self.h2d: list[str] = []
        self.syncs: list[str] = []
        self._h2d_policy = h2d
        self._allowed = 0

    # ------------------------------------------------------------------ API
    @contextlib.contextmanager
    def allow(self) -> Iterator[None]:
        """Inside this block host reads are permitted (for a deliberate, documented sync)."""
        self._allowed += 1
        try:
            yield
        finally:
            self._allowed -= 1

    def reset(self) -> None:
        """Zero every count (e.g. after a warm-up call)."""
        self.reads = [0] * len(self.watched)
        self.writes = [0] * len(self.watched)
        self.read_ops = [[] for _ in self.watched]
        self.h2d.clear()
        self.syncs.clear()

    def __enter__(self) -> NoSync:
        # gradguard's rules run on host floats where a value is on the CPU (a free read there): inside
        # NoSync they take the device path, the one whose sync-freedom this proves
        self._pinned = gradguard.clip._PIN_DEVICE_PATH
        gradguard.clip._PIN_DEVICE_PATH = True
        return super().__enter__()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        gradguard.clip._PIN_DEVICE_PATH = self._pinned
        super().__exit__(exc_type, exc, tb)
        if exc_type is None and self.syncs:
            raise HostSyncError(
                f"{len(self.syncs)} host sync(s) were raised and swallowed inside NoSync: {self.syncs}"
            )

    # ------------------------------------------------------------------ dispatch
    def _refuse(self, what: str) -> None:
        if self._allowed:
            return
        self.syncs.append(what)
        raise HostSyncError(f"host sync inside NoSync: {what}")

    def _check_sync(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = str(func)
        if func in _SYNC_OPS or func.overloadpacket in _SYNC_PACKETS:
            self._refuse(name)
        elif func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and len(args) > 1:
            if any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())):
                self._refuse(f"{name} with a boolean mask (data-dependent shape)")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._refuse(f"{name} without output_size")
        elif func is aten._to_copy.default:
            src = args[0]
            dst = _device_of(kwargs.get("device")) or src.device
            self._check_copy(name, src.device, dst, tuple(src.shape))
        elif func is aten.copy_.default:
            self._check_copy(name, args[1].device, args[0].device, tuple(args[1].shape))

    def _check_copy(self, name: str, src: torch.device, dst: torch.device, shape: tuple[int, ...]) -> None:
        if src.type != "cpu" and dst.type == "cpu":
            self._refuse(f"{name}: copy {src} -> cpu of shape {shape}")
        elif src.type == "cpu" and dst.type != "cpu":
            what = f"{name}: copy cpu -> {dst} of shape {shape}"
            if self._h2d_policy == "raise" and not self._allowed:
                self.syncs.append(what)
                raise HostSyncError(f"host-to-device copy inside NoSync: {what}")
            self.h2d.append(what)

    def _count(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._slot or func.is_view or func in _NO_DATA:
            return
        schema_args = func._schema.arguments
        by_name = {a.name: a for a in schema_args}
        bound = [(v, schema_args[i] if i < len(schema_args) else None) for i, v in enumerate(args)]
        bound += [(v, by_name.get(k)) for k, v in kwargs.items()]
        read: set[int] = set()
        written: set[int] = set()
        for value, arg in bound:
            is_write = arg is not None and arg.alias_info is not None and arg.alias_info.is_write
            is_out = arg is not None and arg.is_out  # out= is only written, never read
            for leaf in tree_flatten(value)[0]:
                if isinstance(leaf, Tensor):
                    for s in self._slot.get(storage_key(leaf) or -1, ()):
                        if not is_out:
                            read.add(s)
                        if is_write:
                            written.add(s)
        name = str(func)
        for s in read:
            self.reads[s] += 1
            self.read_ops[s].append(name)
        for s in written:
            self.writes[s] += 1

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        self._check_sync(func, args, kwargs)
        self._count(func, args, kwargs)
        return func(*args, **kwargs)
