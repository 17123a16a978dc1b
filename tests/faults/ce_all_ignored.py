"""Token-level cross-entropy with ``ignore_index=-100``: a batch whose every target is padding has
no token to average over, and the mean of nothing is 0 / 0 = NaN."""

import torch
from torch import nn

EXPECTED = {"phase": "loss", "module": None, "op": "cross_entropy", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "every target is ignored", "fix": "no valid target"}

torch.manual_seed(0)
model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 20))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(4):  # the last batch holds prompts only: the run ends on its NaN loss
    tokens = torch.randint(0, 20, (4, 6))
    targets = tokens.clone()
    targets[:, :2] = -100  # the prompt is not trained on
    if step == 3:
        targets[:] = -100  # a batch of prompts only
    logits = model(tokens)
    loss = nn.functional.cross_entropy(logits.reshape(-1, 20), targets.reshape(-1), ignore_index=-100)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
