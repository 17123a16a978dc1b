"""A weight decay typed as ``5e2`` for ``5e-4``: SGD adds weight_decay × w to every gradient, so each
step multiplies the weights by 1 − lr × weight_decay = 1 − 0.01 × 500 = −4. The weights flip sign
and grow 4× a step until float32 overflows; clipping the gradients does not touch the decay, and a
lower learning rate only slows the flip."""

import torch
import torch.nn.functional as F
from torch import nn

EXPECTED = {"cause": "explosion"}  # the weights grow 4x a step until float32 overflows
VERDICT = {"id": "weight_decay", "cause": "1 − lr × weight_decay = -4", "fix": "weight_decay=0.0005"}

torch.manual_seed(0)
x_all = torch.randn(1024, 12)
y_all = (x_all[:, 0] > 0).long()
model = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e2)
for step in range(60):
    i = torch.randint(0, 1024, (64,))
    loss = F.cross_entropy(model(x_all[i]), y_all[i])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
