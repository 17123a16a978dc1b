"""A gamma correction, ``x ** 2.2``, on an activation that is meant to be non-negative but is not
quite: a negative base to a fractional power is NaN."""

import torch
from torch import nn

EXPECTED = {"phase": "forward", "module": "gamma", "op": "pow", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "negative base to a fractional power", "fix": "x.clamp_min(0) ** p"}


class Gamma(nn.Module):
    def forward(self, x):
        return x**2.2


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 6)
        self.gamma = Gamma()
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        return self.out(self.gamma(torch.sigmoid(self.enc(x)) - 0.01))


torch.manual_seed(0)
model = Model()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(6):
    x = torch.randn(16, 6)
    if step == 3:
        x[0] = -20.0  # sigmoid saturates at ~0: 0 - 0.01 is slightly negative
    loss = nn.functional.mse_loss(model(x), torch.randn(16, 1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
