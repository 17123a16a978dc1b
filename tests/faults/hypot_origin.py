"""Polar features ``r = hypot(x, y)`` of 2-D points: a point exactly at the origin has an undefined
derivative (0 / 0 in the backward of hypot)."""

import torch
from torch import nn

EXPECTED = {"phase": "backward", "module": "polar", "op": "hypot", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "hypot at 0", "fix": "torch.sqrt(x * x + y * y + eps)"}


class Polar(nn.Module):
    def forward(self, xy):
        return torch.stack([torch.hypot(xy[:, 0], xy[:, 1]), torch.atan2(xy[:, 1], xy[:, 0])], dim=1)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2, bias=False)
        self.polar = Polar()
        self.head = nn.Linear(2, 1)

    def forward(self, xy):
        return self.head(self.polar(self.proj(xy)))


torch.manual_seed(0)
model = Model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(5):
    xy = torch.randn(16, 2)
    if step == 1:
        xy[0] = 0.0  # a point at the origin (the bias-free projection keeps it there)
    loss = model(xy).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
