"""A DistributedDataParallel training script the way the PyTorch DDP tutorial writes one, on CPU:
``torchrun`` sets the ranks, ``init_process_group("gloo")``, a ``DistributedSampler`` over a
synthetic regression set, ``DDP(model)``, ``clip_grad_norm_``, rank 0 prints the loss (averaged
over ranks) and the pre-clip norm of each step and saves ``model.module.state_dict()``.

Run: ``torchrun --nproc-per-node 2 ddp_regression.py``.

``--diverge``: a learning rate far too high for SGD with momentum and no clipping: the weights
oscillate with a growing amplitude until the loss overflows to inf and then NaN.
``--labeled-only``: the loss is the mean over the "labeled" samples of the batch (``y > 0.5``), as
``sum / count``; at step 3 rank 1's batch has none: 0 / 0 on that rank only.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


class Regressor(nn.Module):
    def __init__(self, d_in=16, hidden=64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.body(x)).squeeze(-1)


def make_data(n=1024, d_in=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, generator=g)
    return TensorDataset(x, y)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--max-norm", type=float, default=0.3)
    parser.add_argument("--diverge", action="store_true")
    parser.add_argument("--labeled-only", action="store_true")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(Regressor())
    lr, max_norm = (args.lr, args.max_norm) if not args.diverge else (40.0, None)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    dataset = make_data()
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    loss_fn = nn.MSELoss()

    step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            if args.labeled_only:
                labeled = y > 0.5
                if step == 3 and rank == 1:
                    labeled = torch.zeros_like(labeled)  # a batch with no labeled sample
                out = model(x)
                loss = ((out - y) ** 2 * labeled).sum() / labeled.sum()
            else:
                loss = loss_fn(model(x), y)
            loss.backward()
            if max_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            optimizer.step()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= dist.get_world_size()
            if rank == 0:
                print(f"epoch {epoch} step {step} loss {mean_loss.item():.6f} norm {norm.item():.4f}")
            step += 1

    if rank == 0:
        torch.save(model.module.state_dict(), "regressor.pt")
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    dist.destroy_process_group()
    if not finite:
        raise SystemExit("the weights are not finite")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
