"""A user's training script at a learning rate too high for it (no gradguard in it).

A tanh MLP fits a linear target by plain SGD. At the default ``--lr 1`` the loss overflows within a
few steps (non-finite by step ~10; 0.5 and 0.25 blow up too, by steps 5-30); at 0.12 and below it
trains (mean squared error ~0.03 after 300 steps). The script clips at 1000, far above its norms
(a loose safety net that never binds), and prints its final loss.
"""

import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=1.0)
parser.add_argument("--steps", type=int, default=300)
args = parser.parse_args()

torch.manual_seed(0)
x = torch.randn(512, 8)
y = x @ torch.randn(8, 1)
model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
loss = torch.zeros(())
for step in range(args.steps):
    i = (step * 32) % 512
    loss = nn.functional.mse_loss(model(x[i : i + 32]), y[i : i + 32])
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1000.0)
    optimizer.step()
print(f"final loss {float(loss.detach()):.6g}")
