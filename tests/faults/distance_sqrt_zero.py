"""A center loss with a hand-written Euclidean distance, its class centers initialised from the first
batch's features: those samples sit exactly on their center, and sqrt of exactly 0 has an infinite
derivative, so the forward is finite and the backward is not."""

import torch
from torch import nn

EXPECTED = {"phase": "backward", "module": None, "op": "sqrt", "kind": "inf"}
VERDICT = {"id": "nonfinite_op", "cause": "sqrt at 0", "fix": "torch.sqrt(x + eps)"}

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
centers = None
for step in range(6):
    x = torch.randn(16, 4)
    labels = torch.arange(16) % 4
    feats = model(x)
    if centers is None:  # one center per class: the feature of its first sample
        centers = torch.stack([feats[labels == c][0].detach() for c in range(4)])
    dist = ((feats - centers[labels]) ** 2).sum(dim=1).sqrt()  # hand-written distance
    loss = dist.mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
