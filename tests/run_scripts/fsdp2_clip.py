"""A small FSDP2 training script as the PyTorch tutorial writes one: ``fully_shard`` on each block and
the root, AdamW, and its own ``clip_grad_norm_`` (whose total norm, over sharded gradients, is a
DTensor). Run with ``torchrun --nproc-per-node 2`` (gloo, CPU); ``--nan-step K``: a NaN in rank 0's batch
of step K."""

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nan-step", type=int, default=None)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)
    w = torch.randn(16, 1, generator=torch.Generator().manual_seed(1))
    for step in range(12):
        x = torch.randn(32, 16, generator=g)
        if step == args.nan_step and rank == 0:
            x[3, 5] = float("nan")  # a bad row in the data
        loss = nn.functional.mse_loss(model(x), x @ w)
        optimizer.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        if rank == 0 and step % 4 == 0:
            print(f"step {step} loss {loss.item():.4f} grad norm {norm.full_tensor().item():.4f}", flush=True)
    finite = all(
        bool(p.full_tensor().isfinite().all()) for p in model.parameters()
    )  # (a collective: every rank)
    if rank == 0:
        print("weights finite:", finite)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
