"""Deep SAD's labeled-anomaly term ``eta * dist ** -1`` without moving the center c away from 0 (the
paper pushes near-zero coordinates of c to ±0.1): a bias-free network maps an all-zero anomaly to 0,
exactly the center, and 0 ** -1 = inf."""

import torch
from torch import nn

EXPECTED = {"phase": "loss", "module": None, "op": "pow", "kind": "inf"}
VERDICT = {"id": "nonfinite_op", "cause": "pow at 0", "fix": "(x + eps) ** p"}

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(10, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
model = net
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
with torch.no_grad():
    c = net(torch.zeros(1, 10)).mean(0)  # the center from (badly) zero-filled pretraining data
eta = 1.0
for step in range(6):
    x = torch.randn(16, 10)
    semi = torch.zeros(16)
    semi[:2] = -1  # two labeled anomalies
    if step == 3:
        x[0] = 0.0  # an anomaly recorded as an all-zero vector
    dist = ((net(x) - c) ** 2).sum(1)
    losses = torch.where(semi == 0, dist, eta * dist**semi)
    loss = losses.mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
