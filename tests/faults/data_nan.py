"""A NaN in the data: a tabular row with a missing value read as NaN."""

import torch
from torch import nn

EXPECTED = {"phase": "data", "module": None, "op": None, "kind": "nan"}
VERDICT = {"id": "bad_data", "cause": "the model's input", "fix": "torch.isfinite"}

torch.manual_seed(0)
table = torch.randn(64, 5)
table[37, 2] = float("nan")  # a missing value in the CSV
targets = table.sum(1, keepdim=True).nan_to_num()
model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(8):
    idx = torch.arange(step * 8, step * 8 + 8)
    loss = nn.functional.mse_loss(model(table[idx]), targets[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
