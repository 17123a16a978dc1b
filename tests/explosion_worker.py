"""One rank of the multi-process explosion-recovery test (started by tests/test_recovery.py with torchrun).

Usage: ``torchrun --nproc_per_node 2 explosion_worker.py MODE OUT_DIR`` with MODE ``ddp`` (SGD: the
host-decided path, the onset seen at the step's one read) or ``ddp-warn`` (``on_nonfinite="warn"``:
the sync-free path, the onset seen at the flush).

Every rank trains a DDP linear model on its own half of a batch whose scale runs away from step 20
on, under ``Guard(on_explosion="recover")``: an explosion, then non-finite steps under the recovery's
threshold, each a further recovery. Each rank saves
which steps it skipped and its parameters after every step to ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import gradguard

STEPS = 100  # the batch's scale overflows float32 by ~step 85: non-finite steps recover again


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=g) * (2.0 ** max(0, step - 19))
    return x, x.sum(1, keepdim=True)


def main(mode: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    policy = "warn" if mode == "ddp-warn" else "skip"
    guard = gradguard.Guard(
        model, opt, clip=None, on_nonfinite=policy, on_explosion="recover", max_rollbacks=None,
        log_dir=out / "run", every=5,
    )  # fmt: skip
    skipped: list[bool] = []
    params: list[list[torch.Tensor]] = []
    for step in range(STEPS):
        x, y = batch(step)
        half = slice(rank * len(x) // world, (rank + 1) * len(x) // world)  # each rank its own half
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x[half]), y[half])
        loss.backward()
        guard.step(loss)
        skipped.append(guard.last_step_skipped)
        params.append([p.detach().clone() for p in model.parameters()])
    result = {
        "skipped": skipped,
        "params": params,
        "sync_free": guard._sync_free(),
        "recoveries": guard._explosions.recoveries,
    }
    guard.close()
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()  # both ranks done before teardown (a rank tearing gloo down early aborted once under load)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
