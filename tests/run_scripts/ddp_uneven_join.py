"""DDP with uneven inputs across ranks (each rank reads its own shard), handled with DDP's Join
context manager, as PyTorch's "uneven inputs" tutorial does: rank 0 runs 14 steps, rank 1 runs 10."""

import argparse
import hashlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset


def load_shard(rank: int, rows: int, bad_row: int | None = None) -> TensorDataset:
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(rows, 8, generator=g)
    y = (x[:, 0] * x[:, 1] - x[:, 2]).unsqueeze(1)
    if rank == 0 and bad_row is not None:
        x[bad_row, 5:] = float("nan")  # a dropped-out sensor stretch in the long shard
    return TensorDataset(x, y)


def main(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 1)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(load_shard(rank, 330 if rank == 0 else 250, args.bad_row), batch_size=24)
    guard = None
    if args.guard:
        import gradguard

        guard = gradguard.Guard(model, optimizer, on_nonfinite="skip", log_dir=args.guard)
    steps = 0
    with model.join():
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if guard is not None:
                guard.step(loss)
            else:
                optimizer.step()
            steps += 1
    if guard is not None:
        guard.close()
    dist.barrier()
    if rank == 0:
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
        print(f"rank 0 ran {steps} steps; weights {digest.hexdigest()[:16]}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--guard", default=None, help="guard the loop in code, logging into this folder")
    parser.add_argument("--bad-row", type=int, default=None, help="a NaN in this row of rank 0's shard")
    main(parser.parse_args())
