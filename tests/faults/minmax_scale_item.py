"""Min-max scaling inside ``forward`` with the range read as a Python float (``.item()``): a batch
whose values are all equal (a sensor stuck at one reading) has a range of exactly 0.0, and
``(x - lo) / span`` divides by that number: 0 / 0 is NaN."""

import torch
from torch import nn

EXPECTED = {"phase": "forward", "op": "div", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "division by zero", "fix": "clamp_min(eps)"}


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        lo, span = x.min().item(), (x.max() - x.min()).item()
        return self.net((x - lo) / span)


torch.manual_seed(0)
model = Scaled()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
for step in range(8):
    x = torch.rand(16, 8)
    if step == 5:
        x = torch.full((16, 8), 0.3)  # the sensor stuck
    loss = nn.functional.mse_loss(model(x), torch.randn(16, 1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
