"""Input-gradient regularization ("double backpropagation"): a classifier on a 2-D two-moons problem
lifted to 16-D, trained with cross-entropy plus ``gp_weight`` times the mean squared norm of the loss's
gradient with respect to the input (autograd.grad with create_graph=True), SGD with momentum.

The default ``--gp-weight 1e4`` is a typo for 1e-4: the penalty is 99 % of the loss at the start, the
run explodes and never learns the task."""

import argparse

import torch
import torch.nn.functional as F
from torch import nn


def two_moons(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * torch.pi
    label = torch.randint(0, 2, (n,), generator=g)
    xy = torch.stack([torch.cos(t) + label, torch.sin(t) * (1 - 2 * label) + 0.4 * label], 1)
    xy = xy + 0.15 * torch.randn(n, 2, generator=g)
    lift = torch.randn(2, 16, generator=torch.Generator().manual_seed(7))
    return xy @ lift, label


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--gp-weight", type=float, default=1e4)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = two_moons(4096, 0)
    x_val, y_val = two_moons(1000, 1)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for epoch in range(args.epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            xb = x[idx].clone().requires_grad_(True)
            ce_each = F.cross_entropy(model(xb), y[idx], reduction="none")
            ce = ce_each.mean()
            (grad_x,) = torch.autograd.grad(ce_each.sum(), xb, create_graph=True)
            penalty = grad_x.pow(2).sum(1).mean()
            loss = ce + args.gp_weight * penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
        print(f"epoch {epoch} ce {ce.item():.4f} val_acc {accuracy:.3f}")


if __name__ == "__main__":
    main()
