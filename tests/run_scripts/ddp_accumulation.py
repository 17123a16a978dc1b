"""A classifier under DDP with gradient accumulation through model.no_sync(); ``--bad-sample I`` puts a NaN
feature into sample I of the dataset (which a DistributedSampler deals to one rank)."""

import argparse
import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def make_dataset(n: int = 256, bad_sample: int | None = None) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 20, generator=g)
    y = (x @ torch.randn(20, 5, generator=g)).argmax(1)
    if bad_sample is not None:
        x[bad_sample, 7] = float("nan")
    return TensorDataset(x, y)


def main(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(20, 32), nn.GELU(), nn.Linear(32, 5)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dataset = make_dataset(bad_sample=args.bad_sample)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=16, sampler=sampler, drop_last=True)
    criterion = nn.CrossEntropyLoss()
    optimizer.zero_grad()
    for i, (x, y) in enumerate(loader):
        last = (i + 1) % args.accum == 0
        with contextlib.nullcontext() if last else model.no_sync():
            loss = criterion(model(x), y) / args.accum
            loss.backward()
        if last:
            optimizer.step()
            optimizer.zero_grad()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--bad-sample", type=int, default=None)
    main(parser.parse_args())
