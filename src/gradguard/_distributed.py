"""Rank-consistent numbers for the Guard under DDP and FSDP2 (``fully_shard``): one all-reduce a step.

Under DDP every rank holds the whole (all-reduced) gradient, so the norms are already global,
but a rank's loss and a value written into one rank's gradient after the all-reduce are local.
Under FSDP2 each gradient is a :class:`~torch.distributed.tensor.DTensor` sharded on dim 0 over a
1-D mesh; its norm is the p-norm of the shards' norms. :class:`Reducer` packs, per step, into one
float64 vector: the loss, the p-th powers of the sharded tensors' local norms, and this rank's
"loss non-finite", "gradient non-finite" and "NaN" flags, then makes **one** ``all_reduce`` (SUM;
MAX for ``p = inf``) of ``4 + (sharded tensors)`` floats. Every rank then sees the same mean loss, the same full-tensor
norms and the same flags, so every rank makes the same decision.

Nothing here reads a value on the host, and nothing here imports ``torch.distributed.tensor``: that
module pulls sympy (about 0.5 s, more than the rest of gradguard), and a DTensor cannot exist before
its module is imported, so the DTensor checks look for the class where it already is (:func:`_dtensor`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from gradguard.errors import GradGuardError

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["Reducer", "any_dtensor", "gather", "local", "rank", "same_on_all_ranks", "sharded", "world"]


def world(group: dist.ProcessGroup | None = None) -> int:
    """The number of ranks in ``group`` (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank() -> int:
    """This process's rank (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def same_on_all_ranks(value: object) -> object:
    """Rank 0's ``value`` on every rank (a broadcast; ``value`` itself without torch.distributed)."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: object, group: dist.ProcessGroup | None = None) -> list[object]:
    """Every rank's ``value``, in rank order: a collective, so every rank of ``group`` calls it at
    the same point (the anomaly path of a step all ranks skipped: their flags are all-reduced)."""
    out: list[object] = [None] * world(group)
    dist.all_gather_object(out, value, group=group)
    return out


def _dtensor() -> type[DTensor] | None:
    """The DTensor class if some code of this process imported it (FSDP2, ``distribute_tensor``…), else None.

    Without it no tensor can be a DTensor, so the checks below need not import it (and sympy with it).
    """
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds (the local shard of a DTensor; ``t`` itself otherwise)."""
    dtensor = _dtensor()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def any_dtensor(tensors: Sequence[Tensor]) -> bool:
    """Whether some of ``tensors`` are DTensors (FSDP2), in one process too (their local shards are read)."""
    dtensor = _dtensor()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def sharded(tensors: Sequence[Tensor]) -> list[bool]:
    """Which tensors are DTensors sharded over a 1-D mesh (their norms need the other ranks' shards).

    Raises:
        GradGuardError: a DTensor on a mesh of more than one dimension (HSDP, TP × FSDP), whose
            norm needs a reduction over some mesh dimensions only.
    """
    dtensor = _dtensor()
    out = []
    for t in tensors:
        if dtensor is None or not isinstance(t, dtensor):
            out.append(False)
            continue
        if t.device_mesh.ndim != 1:
            raise GradGuardError(
                f"gradguard got a DTensor on a {t.device_mesh.ndim}-D device mesh (placements {t.placements}); "
                "it supports FSDP2 on a 1-D mesh and DDP. Guard a 1-D FSDP2 model, or use on_nonfinite with "
                "clip='none' and measure per mesh dimension yourself."
            )
        out.append(any(pl.is_shard() or pl.is_partial() for pl in t.placements))
    return out


class Reducer:
    """One all-reduce per step that makes the loss, the norms and the flags the same on every rank.

    Args:
        sharded: per tensor (in the order the norms come), whether it is sharded across ranks.
        norm_type: p of the norms.
        group: the process group (``None``: the default group).
    """

    def __init__(
        self, sharded: Sequence[bool], norm_type: float, group: dist.ProcessGroup | None = None
    ) -> None:
        self.norm_type = float(norm_type)
        self.group = group
        self.world = world(group)
        self._mask = list(sharded)
        self._index: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}
        self._joinables: list[Any] = []  # DDP modules whose Join context (uneven inputs) pauses the reduce

    def watch_join(self, module: Any) -> None:
        """Pause while ``module`` (a ``DistributedDataParallel``) runs under its ``join()`` context:
        a rank that ran out of data only shadows DDP's own collectives there, so a further per-step
        all-reduce has no partner (gloo: "collective mismatch"). DDP has averaged the gradients on
        the ranks still training, so their norms and flags agree without it; the loss is each rank's."""
        if hasattr(module, "_join_config"):
            self._joinables.append(module)

    @property
    def paused(self) -> bool:
        """Whether a DDP Join context is on: no collective of the guard's may run."""
        return any(getattr(getattr(m, "_join_config", None), "enable", False) for m in self._joinables)

    def gather(self, value: object) -> list[object] | None:
        """Every rank's ``value`` (:func:`gather` over this group), or ``None`` while :attr:`paused`."""
        return None if self.paused else gather(value, self.group)

    @property
    def floats_per_step(self) -> int:
        """How many floats each step's all-reduce carries."""
        return 4 + sum(self._mask)

    def _sharded_index(self, present: Sequence[int], device: torch.device) -> Tensor | None:
        """Positions in ``present`` of the sharded tensors, as a cached device index (None if none)."""
        rows = tuple(j for j, i in enumerate(present) if self._mask[i])
        if not rows:
            return None
        idx = self._index.get((rows, device))
        if idx is None:
            idx = self._index[(rows, device)] = torch.tensor(rows, dtype=torch.long, device=device)
        return idx

    def reduce(self, norms: Tensor, loss: Tensor, present: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """All-reduce this rank's numbers.

        Args:
            norms: per-tensor norms of the local gradients (shards for sharded tensors), in the
                order of ``present``.
            loss: this rank's 0-D float32 loss.
            present: positions, in the ``sharded`` mask, of the tensors in ``norms``.

        Returns:
            ``(norms, loss, flags)``: full-tensor norms (same dtype as ``norms``), the mean loss
            over ranks (the max for ``p = inf``), and three bool flags: some rank's loss was
            non-finite, some rank's local gradients held a non-finite value, a NaN.
        """
        p = self.norm_type
        device = norms.device
        n64 = norms.to(torch.float64)
        local_total = n64.sum() if n64.numel() else torch.zeros((), dtype=torch.float64, device=device)
        bad = torch.isnan(local_total - local_total).to(torch.float64)
        nan = torch.isnan(local_total).to(torch.float64)
        idx = self._sharded_index(present, device)
        loss64 = loss.to(torch.float64).reshape(1)
        parts = [loss64, torch.isnan(loss64 - loss64).to(torch.float64), bad.reshape(1), nan.reshape(1)]
        if idx is not None:
            shard = n64.index_select(0, idx)
            parts.append(shard if math.isinf(p) else shard.pow(p))
        vec = torch.cat(parts)
        op = dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM
        dist.all_reduce(vec, op=op, group=self.group)
        mean_loss = vec[0] if math.isinf(p) else vec[0] / self.world
        out = n64
        if idx is not None:
            full = vec[4:] if math.isinf(p) else vec[4:].pow(1.0 / p)
            out = n64.index_copy(0, idx, full)
        return out.to(norms.dtype), mean_loss.to(torch.float32), vec[1:4] > 0

    def full_norms(self, norms: Tensor, present: Sequence[int] | None = None) -> Tensor:
        """Full-tensor norms from local ones (an all-reduce of the sharded tensors' powers only)."""
        present = range(len(self._mask)) if present is None else present
        idx = self._sharded_index(present, norms.device)
        if idx is None:
            return norms
        p = self.norm_type
        shard = norms.to(torch.float64).index_select(0, idx)
        vec = shard if math.isinf(p) else shard.pow(p)
        dist.all_reduce(vec, op=dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM, group=self.group)
        full = vec if math.isinf(p) else vec.pow(1.0 / p)
        return norms.to(torch.float64).index_copy(0, idx, full).to(norms.dtype)
