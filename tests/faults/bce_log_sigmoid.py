"""A hand-written binary cross-entropy, ``-(y log σ(z) + (1 - y) log(1 - σ(z)))``, on unnormalised
features: σ(z) rounds to exactly 1 in float32 for z > 17, and log(1 - 1) = -inf."""

import torch
from torch import nn

EXPECTED = {"phase": "loss", "module": None, "op": "log", "kind": "-inf"}
VERDICT = {"id": "nonfinite_op", "cause": "log of 0", "fix": "BCEWithLogitsLoss"}

torch.manual_seed(0)
model = nn.Linear(3, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
for step in range(6):
    x = torch.randn(32, 3) * 40 + 30  # raw sensor readings, never normalised
    y = (torch.rand(32) > 0.5).float()
    p = torch.sigmoid(model(x).squeeze(1))
    loss = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
