"""A learning rate far too high for plain SGD on a regression MLP: the weights and gradients grow
step after step until they overflow (an explosion, no single bad op)."""

import torch
from torch import nn

EXPECTED = {"cause": "explosion"}
VERDICT = {"id": "explosion", "cause": "Gradient explosion", "fix": "learning rate"}

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
x = torch.randn(256, 8)
y = x @ torch.randn(8, 1) * 3
for step in range(60):
    idx = torch.randint(0, 256, (32,))
    loss = nn.functional.mse_loss(model(x[idx]), y[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
