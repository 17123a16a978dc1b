"""A masked mean loss, ``(l * mask).sum() / mask.sum()``: a batch with no valid token divides 0 by 0."""

import torch
from torch import nn

EXPECTED = {"phase": "loss", "module": None, "op": "div", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "division by zero", "fix": "guard empty counts"}

torch.manual_seed(0)
model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 30))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(6):
    tokens = torch.randint(0, 30, (4, 7))
    mask = (torch.rand(4, 7) > 0.3).float()
    if step == 3:
        mask.zero_()  # every position is padding in this batch
    logits = model(tokens)
    per_token = nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    loss = (per_token * mask).sum() / mask.sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
