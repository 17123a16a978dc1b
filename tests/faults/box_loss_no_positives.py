"""An anchor-based detector's box-regression loss averaged over the positive anchors only:
``smooth_l1_loss(deltas[pos], targets[pos])``. Positives are rare (3 % of anchors); a batch with none
averages over no elements — 0 / 0 = NaN: the loss the script logs and averages is NaN from then on, and a
guard skips the step (its other terms' gradients lost). Skipping the term on an empty selection (or dividing
a sum by the count clamped to 1) keeps every step."""

import torch
import torch.nn.functional as F
from torch import nn

EXPECTED = {"phase": "loss", "op": "smooth_l1_loss", "kind": "nan"}
VERDICT = {"id": "nonfinite_op", "cause": "a mean over no elements", "fix": "clamp_min(1)"}

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))  # objectness + 4 box deltas
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
for step in range(12):
    features = torch.randn(32, 16)
    positive = torch.zeros(32, dtype=torch.bool) if step in (3, 11) else torch.rand(32) < 0.2
    out = model(features)
    objectness = F.binary_cross_entropy_with_logits(out[:, 0], positive.float())
    box = F.smooth_l1_loss(out[positive, 1:], torch.randn(32, 4)[positive])
    loss = objectness + box
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
