"""A hand-written feature standardisation inside the model, ``(x - mean) / std``: a feature that is
constant within a batch has std 0, and 0 / 0 = NaN."""

import torch
from torch import nn

EXPECTED = {"phase": "forward", "module": "norm", "op": "div", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "division by zero", "fix": "clamp_min(eps)"}


class Standardize(nn.Module):
    def forward(self, x):
        return (x - x.mean(0)) / x.std(0)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = Standardize()
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.mlp(self.norm(x))


torch.manual_seed(0)
model = Model()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(6):
    x = torch.randn(16, 4)
    if step == 2:
        x[:, 1] = 3.0  # a sensor stuck at one value for a whole batch
    y = torch.randn(16, 1)
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
