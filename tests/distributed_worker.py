"""One rank of the multi-process Guard tests (started by tests/test_distributed.py with torchrun).

Usage: ``torchrun --nproc_per_node 2 distributed_worker.py MODE OUT_DIR`` with MODE one of
``ddp`` (SGD with momentum: the one-host-read path), ``ddp-fused`` (fused AdamW: the sync-free path),
``fsdp`` (FSDP2 ``fully_shard``, SGD) and ``fsdp-fused``; ``ddp-data`` and ``fsdp-data``: the NaN is
in rank 1's batch instead (the data), not written into its gradient.

Every rank trains the same small MLP for 6 steps under ``Guard(on_nonfinite="skip", clip="norm:0.05")``;
at step 3, **after** the gradients were all-reduced (DDP) or reduce-scattered (FSDP2), rank 1 writes a
NaN into one element of its local gradient. Each rank saves what it saw to ``OUT_DIR/rank{r}.pt``:
its skip flags, its full parameters after every step, the guard's pre-clip norm at step 0 and the
clipped full gradients of step 0. Rank 0 also computes the single-process reference of step 0 (the
same model and the whole batch, ``torch.nn.utils.get_total_norm`` and ``clip_grad_norm_``).
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import gradguard

MAX_NORM = 0.05
STEPS = 6
BAD_STEP = 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 33), nn.Tanh(), nn.Linear(33, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 10, generator=g), torch.randn(16, 4, generator=g)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(mode: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = make_model()
    reference = copy.deepcopy(base)
    fused = mode.endswith("fused")
    data_fault = mode.endswith("-data")
    loss_fault = mode.endswith("-loss")  # the loss code of one rank makes NaN from finite inputs
    if mode.startswith("ddp"):
        model: nn.Module = nn.parallel.DistributedDataParallel(base)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in base:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        model = fully_shard(base)
    if fused:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    log_dir = out / "run"
    guard = gradguard.Guard(
        model,
        opt,
        clip=f"norm:{MAX_NORM}",
        on_nonfinite="skip",
        log_dir=log_dir,
        every=2,
        rank_logs=mode == "ddp",
    )
    result: dict[str, object] = {"skipped": [], "params": [], "sync_free": guard._sync_free()}
    for step in range(STEPS):
        x, y = batch(step)
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        x = x[shard].clone()
        if data_fault and step == BAD_STEP and rank == 1:  # a missing value in this rank's batch
            x[2, 5] = math.nan
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y[shard]).pow(2).mean()
        if (
            loss_fault and step == BAD_STEP and rank == 1
        ):  # a mean over an empty selection on this rank: 0 / 0
            kept = y[shard][y[shard] > 1e9]
            loss = loss + kept.sum() / kept.numel()
        loss.backward()
        if (
            not data_fault and not loss_fault and step == BAD_STEP and rank == 1
        ):  # after the all-reduce: only this rank's copy is bad
            grad = base[2].weight.grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            local.view(-1)[0] = math.nan
        guard.step(loss)
        result["skipped"].append(guard.last_step_skipped)  # type: ignore[union-attr]
        if step == 0:
            result["grads0"] = [full(p.grad).clone() for p in base.parameters()]
        result["params"].append([full(p.detach()).clone() for p in base.parameters()])  # type: ignore[union-attr]
    guard.close()
    if rank == 0:
        x, y = batch(0)
        ref_loss = (reference(x) - y).pow(2).mean()
        ref_loss.backward()
        result["ref_loss0"] = float(ref_loss)
        ref_grads = [p.grad for p in reference.parameters()]
        result["ref_norm0"] = float(torch.nn.utils.get_total_norm(ref_grads))
        torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
        result["ref_grads0"] = [g.clone() for g in ref_grads]
        result["floats_per_step"] = guard._reducer.floats_per_step if guard._reducer is not None else None
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()  # both ranks done before teardown (a rank tearing gloo down early aborted once under load)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
