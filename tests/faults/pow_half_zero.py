"""A metric-learning head computing distances as ``(d * d).sum() ** 0.5``: at a distance of exactly
0 the backward of the power is infinite (0 * inf = NaN further down)."""

import torch
from torch import nn

EXPECTED = {"phase": "backward", "module": "dist", "op": "pow", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "pow at 0", "fix": "x.clamp_min(eps) ** p"}


class PairDistance(nn.Module):
    def forward(self, a, b):
        d = a - b
        return (d * d).sum(-1) ** 0.5


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 4)
        self.dist = PairDistance()

    def forward(self, a, b):
        return self.dist(self.enc(a), self.enc(b))


torch.manual_seed(0)
model = Siamese()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
for step in range(6):
    a = torch.randn(8, 6)
    b = torch.randn(8, 6)
    if step == 2:
        b[3] = a[3]  # a duplicate pair in the batch: distance exactly 0
    same = torch.zeros(8)
    loss = (model(a, b) - same).pow(2).mean() + model(a, b).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
